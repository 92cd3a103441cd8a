"""The pieces of `nemo-ft serve` that need no server: expected HF-PEFT shapes, vLLM's command line (the
spare LoRA slot), adapter list parsing, process-tree stopping, signal handling, load statistics."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nemo_ft.clients import LoadResult
from nemo_ft.export import AdapterSpec, ModelSpec, expected_keys, hf_peft_shapes, lora_to_hf_peft
from nemo_ft.peft import LORA_TARGETS
from nemo_ft.runtime import servers


def _spec(targets=LORA_TARGETS, r=8):
    model = ModelSpec(hidden_size=64, num_attention_heads=4, num_layers=2, ffn_hidden_size=40, num_query_groups=2,
                      activation="fast-swiglu")
    return AdapterSpec(model=model, schemes=("lora",), adapter_dim=r, alpha=16.0, targets=targets)


@pytest.mark.parametrize("targets", [LORA_TARGETS, ("attention_qkv",), ("mlp_fc1", "attention_dense")])
def test_hf_peft_shapes_are_what_lora_to_hf_peft_writes(targets):
    spec = _spec(targets)
    rng = np.random.default_rng(0)
    adapter = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in expected_keys(spec).items()}
    written = {k: v.shape for k, v in lora_to_hf_peft(adapter, spec).items()}
    assert hf_peft_shapes(spec) == written
    assert written  # something to compare


def test_vllm_rank_rounds_up_to_what_vllm_accepts():
    assert [servers.vllm_max_lora_rank(r) for r in ([16], [3, 16], [17], [1], [])] == [16, 16, 32, 1, 1]
    with pytest.raises(ValueError):
        servers.vllm_max_lora_rank([1024])


def test_vllm_command_keeps_a_free_lora_slot_and_binds_loopback():
    argv = servers.vllm_argv("py", Path("/e/hf_base"), "base", {"a": Path("/a/hf_peft"), "b": Path("/b/hf_peft")},
                             [16, 8], 8000, "float32", 128)
    assert argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    at = {k: argv[argv.index(k) + 1] for k in ("--model", "--served-model-name", "--host", "--port", "--max-loras",
                                              "--max-lora-rank", "--dtype", "--max-model-len")}
    assert at == {"--model": "/e/hf_base", "--served-model-name": "base", "--host": "127.0.0.1", "--port": "8000",
                  "--max-loras": "3", "--max-lora-rank": "16", "--dtype": "float32", "--max-model-len": "128"}
    i = argv.index("--lora-modules")
    assert argv[i + 1:i + 3] == ["a=/a/hf_peft", "b=/b/hf_peft"]
    alone = servers.vllm_argv("py", Path("/m"), "base", {}, [], 8000, "float32", 128)
    assert "--enable-lora" not in alone and "--max-loras" not in alone
    env = servers.vllm_env(1)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env


def test_adapter_entries_accept_name_dir_strings_bare_dirs_and_mappings():
    from omegaconf import OmegaConf

    from nemo_ft.errors import ConfigError
    from nemo_ft.stages.serve import _entries

    assert _entries(None) == []
    assert _entries([]) == []
    assert _entries(["a=/x/e", "/y/e"]) == [("a", "/x/e"), (None, "/y/e")]
    assert _entries(OmegaConf.create({"a": "/x", "b": "/y"})) == [("a", "/x"), ("b", "/y")]
    with pytest.raises(ConfigError):
        _entries("a=/x")


def test_child_server_stop_ends_the_whole_tree_even_when_it_ignores_sigterm(tmp_path):
    # a "server" whose children ignore SIGTERM, and one of them leaves the process group
    script = "trap '' TERM; sleep 60 & setsid sleep 60 & sleep 60 & wait"
    server = servers.ChildServer.start("x", ["bash", "-c", script], dict(os.environ), tmp_path / "x.log")
    deadline = time.monotonic() + 10
    while len(server.seen) < 4 and time.monotonic() < deadline:  # bash and its three sleeps
        assert server.died() is None
        time.sleep(0.1)
    outside = [p for p in server.seen if p != server.proc.pid and os.getpgid(p) != server.proc.pid]
    report = server.stop(timeout_s=1.0)
    # SIGTERM was ignored: the leader (killpg) and the one outside the group needed SIGKILL. The group's
    # other members die with the killpg, so whether they are listed as killed again is a race.
    assert outside and report["left"] == [] and {server.proc.pid, *outside} <= set(report["killed"]), report
    assert not server._alive()


def test_child_server_stop_finds_workers_whose_server_was_killed(tmp_path):
    server = servers.ChildServer.start("x", ["bash", "-c", "sleep 60 & sleep 60 & wait"], dict(os.environ),
                                       tmp_path / "x.log")
    time.sleep(0.5)
    server.died()  # seen while running, as the serve loop does
    os.kill(server.proc.pid, signal.SIGKILL)
    time.sleep(0.2)
    assert server.died() == "exited with code -9"
    report = server.stop(timeout_s=2.0)
    assert report["left"] == [] and not server._alive()


def test_wait_ready_reports_the_servers_own_log_when_it_dies(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("starting\nRuntimeError: no model here\n")
    with pytest.raises(servers.ServerFailed) as err:
        servers.wait_ready(["http://127.0.0.1:9/health"], 30, lambda: "exited with code 1", log)
    assert "exited with code 1" in str(err.value) and "RuntimeError: no model here" in str(err.value)
    t = time.monotonic()
    with pytest.raises(servers.ServerFailed) as err:
        servers.wait_ready([f"http://127.0.0.1:{servers.free_port()}/health"], 0.5, lambda: None, log)
    assert "not ready after 0.5 s" in str(err.value) and time.monotonic() - t < 5


def test_sigterm_becomes_keyboardinterrupt_so_finally_blocks_run():
    code = ("import os, signal, time\nfrom nemo_ft.runtime.servers import stop_signals\n"
            "with stop_signals():\n    try:\n        os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
            "    except KeyboardInterrupt as e:\n        print('stopped', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "stopped SIGTERM", out.stderr


def test_load_percentiles_are_nearest_rank():
    r = LoadResult(answers=[], wall_s=2.0, clients=1, latencies=[i / 100 for i in range(1, 101)])
    assert (r.percentile(50), r.percentile(99), r.percentile(100)) == (0.5, 0.99, 1.0)
