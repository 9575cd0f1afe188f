"""The real wandb package behind `logger.wandb=true`, with the network cut off: it falls back to
offline under the run directory and writes the API key into no file (a few seconds each)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from finetune.metrics.trackers import WandbTracker
from tests.unit.metrics.test_trackers import PLAN


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_real_wandb_never_writes_the_api_key(
        mode: str, logger_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real wandb package: `online` with a key but no network falls back to offline. Every
    file written (run dir, config, cache and data dirs, HOME) is searched for the key;
    connections to anything but loopback are refused and recorded."""
    sentinel = "ftsentinel" + "5" * 30  # wandb expects a 40-character key
    monkeypatch.setenv("WANDB_API_KEY", sentinel)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the mode must come from the config
    for var in ("HOME", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    remote: list[object] = []
    real_connect = socket.socket.connect

    def guarded_connect(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and \
                address[0] not in ("127.0.0.1", "::1", "localhost"):
            remote.append(address)
            raise OSError("network access in a unit test")
        real_connect(sock, address)

    def guarded_create(address, timeout=None):
        remote.append(address)
        raise OSError("network access in a unit test")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "create_connection", guarded_create)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = WandbTracker(logger_cfg(wandb=True, mode=mode, project="p"), run_dir)
    tracker.start()
    tracker.store_init_configuration({"optim": {"lr": 1e-4}, "kernel_plan": PLAN})
    tracker.describe(PLAN)
    tracker.log({"loss": 2.0}, step=1)
    tracker.log_summary({"last_loss": 2.0}, None)
    tracker.finish()
    assert tracker.run.settings.mode == "offline"
    assert any(p.suffix == ".wandb" for p in run_dir.rglob("*"))  # recorded under the run
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert [p for p in written if sentinel.encode() in p.read_bytes()] == []
    # Only our reachability probe of the online run may have tried the network (and failed).
    assert all(address[0] == "api.wandb.ai" for address in remote)
    assert (len(remote) == 1) == (mode == "online")
