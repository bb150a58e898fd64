"""Running the real Hub clients against the local server: huggingface_hub reads HF_ENDPOINT once, at import,
so every client runs in a fresh subprocess whose environment points at the server."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

CLIENT_TIMEOUT_S = 180
#: The local server's token in tests: conftest exports it as $OTFUSION_HUB_TOKEN, which every `HubServer()`
#: started without `token=` uses, and every client below sends it as HF_TOKEN.
TEST_TOKEN = "test-token-not-secret"
REPO_ROOT = Path(__file__).resolve().parents[1]


def client_env(hub_url: str, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a client of the local server: a throwaway HF_HOME, the test token, no Xet."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"
    }
    env.update(
        HF_ENDPOINT=hub_url,
        HF_HUB_DISABLE_XET="1",
        HF_TOKEN=TEST_TOKEN,
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_OFFLINE="0",
        HF_DATASETS_OFFLINE="0",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + str(REPO_ROOT / "tests"),
    )
    env.update(extra)
    return env


def run_python(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Runs `script` (dedented) with the current interpreter; never raises on a non-zero exit."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=CLIENT_TIMEOUT_S,
    )  # fmt: skip


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Runs `otfusion-hub ARGS` as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "hf_otfusion.cli", *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=CLIENT_TIMEOUT_S,
    )  # fmt: skip
