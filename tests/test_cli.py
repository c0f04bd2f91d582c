"""The errors a user meets first: bad flags, devices and addresses are one-line errors naming the flag, found before
any model loads, with one exit-status convention (0 success, 2 bad arguments or input, 1 runtime failure). The
commands run in-process through `main(argv)`; where a model would load, a stand-in fails the test if it is reached."""

import json
import re
import socket
from types import SimpleNamespace

import pytest
import torch

from qwen35.cli import main


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to build an LLM fails the test: the error must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model started loading before the arguments were checked")

    monkeypatch.setattr("qwen35.llm.LLM", refuse)
    monkeypatch.setattr("qwen35.llm.load_model", refuse)
    monkeypatch.setattr("qwen35.models.loader.load_model", refuse)


def usage_error(argv, capsys) -> str:
    """Run main(argv), expect argparse's exit status 2 with a one-line message; return the message."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def failure(argv, capsys) -> str:
    """Run main(argv), expect exit status 2 from a bad-input error; return its one line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--stop-token-ids", "a,b", "x"], "argument --stop-token-ids: invalid int list 'a,b'"),
    (["chat", "--stop-token-ids", "1,,2"], "argument --stop-token-ids: invalid int list '1,,2'"),
    (["forward", "--token-ids", "1,x"], "argument --token-ids: invalid int list '1,x'"),
    (["generate", "--max-num-seqs", "0", "x"], "argument --max-num-seqs: must be at least 1, got 0"),
    (["generate", "--max-model-len", "-5", "x"], "argument --max-model-len: must be at least 1, got -5"),
    (["serve", "--kv-cache-bytes", "0"], "argument --kv-cache-bytes: must be at least 1, got 0"),
    (["serve", "--state-snapshot-bytes", "-1"], "argument --state-snapshot-bytes: must be at least 0, got -1"),
    (["serve", "--max-waiting", "0"], "argument --max-waiting: must be at least 1, got 0"),
    (["serve", "--max-body-bytes", "-1"], "argument --max-body-bytes: must be at least 1, got -1"),
    (["serve", "--port", "99999"], "argument --port: must be in 0..65535 (0 picks a free port), got 99999"),
    (["serve", "--port", "http"], "argument --port: invalid port value: 'http'"),
    (["serve", "--default-chat-template-kwargs", "{x"], "argument --default-chat-template-kwargs: invalid JSON '{x'"),
    (["serve", "--default-chat-template-kwargs", "[1]"],
     "argument --default-chat-template-kwargs: must be a JSON object ({...}), got '[1]'"),
    (["serve", "--limit-mm-per-prompt", "[1]"], "argument --limit-mm-per-prompt: must be a JSON object"),
    (["serve", "--limit-mm-per-prompt", '{"audio": 1}'],
     "argument --limit-mm-per-prompt: limit_mm_per_prompt takes {'image': n, 'video': m} with n, m >= 0; got audio=1"),
    (["serve", "--limit-mm-per-prompt", '{"image": true}'], "argument --limit-mm-per-prompt: limit_mm_per_prompt"),
    (["generate", "--device", "foo", "x"], "argument --device: unknown device 'foo' (use cpu, cuda or cuda:N)"),
    (["serve", "--device", "meta"], "argument --device: device 'meta' is not supported"),
    (["forward", "--device", "cuda:99"], "argument --device: device 'cuda:99': "),
    (["serve", "--api-key", " key"], "argument --api-key: the API key must be non-empty, without control characters"),
    (["serve", "--body-timeout", "nan"], "argument --body-timeout: must be a positive number of seconds, got nan"),
])
def test_bad_flags_name_themselves_before_loading(argv, message, capsys, no_loading):
    assert message in usage_error(argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_cpu_machine_is_a_usage_error(capsys, no_loading):
    msg = usage_error(["generate", "--device", "cuda", "x"], capsys)
    assert "argument --device: device 'cuda': " in msg
    assert "no CUDA support" in msg or "no CUDA GPU is visible" in msg


def test_llm_checks_the_device_before_loading():
    from qwen35.llm import LLM

    # the device is named, not the (also bad) checkpoint: nothing was read yet
    with pytest.raises(ValueError, match="unknown device 'foo'"):
        LLM("/nonexistent", device="foo")
    with pytest.raises(ValueError, match="limit_mm_per_prompt takes"):
        from qwen35.llm import media_limits

        media_limits([1])


def test_chat_does_not_take_flags_it_would_ignore(capsys, no_loading):
    for flag in ("--n", "--logprobs", "--prompt-logprobs"):
        assert usage_error(["chat", flag, "2"], capsys) == f"qwen35 chat: error: argument {flag}: not available " \
            "in chat, which shows one answer as text (qwen35 generate --json takes it)"
    # generate streams plain text: logprobs only with --json
    for flag in ("--logprobs", "--prompt-logprobs"):
        for value in ("0", "3"):
            assert "--logprobs and --prompt-logprobs need --json" in usage_error(["generate", flag, value, "x"], capsys)


def test_missing_media_file_is_named_before_loading(tmp_path, capsys, no_loading):
    assert failure(["generate", "--image", str(tmp_path / "nope.png"), "x"], capsys) == \
        f"qwen35 generate: error: --image {tmp_path / 'nope.png'}: no such file"
    assert "--video" in failure(["chat", "--video", str(tmp_path / "nope.mp4")], capsys)


def test_info_unknown_name_is_exit_2(capsys):
    msg = failure(["info", "qwen3.5-1t"], capsys)
    assert msg.startswith("qwen35 info: error: 'qwen3.5-1t' is neither a checkpoint directory nor a preset")


def test_forward_token_ids_outside_the_vocabulary(tmp_path, capsys, no_loading):
    from qwen35.demo import RANDOM_CONFIG

    (tmp_path / "config.json").write_text(json.dumps(RANDOM_CONFIG))  # a config alone: the check reads nothing else
    msg = failure(["forward", "--model", str(tmp_path), "--token-ids", "1,248320"], capsys)
    assert msg == "qwen35 forward: error: --token-ids must be in 0..248319, got [1, 248320]"


def test_serve_checks_the_address_before_loading(capsys, no_loading):
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        msg = failure(["serve", "--port", str(port)], capsys)
        assert msg == f"qwen35 serve: error: cannot bind --host 127.0.0.1 --port {port}: Address already in use"
    finally:
        busy.close()
    # an address this machine does not have (TEST-NET-1)
    msg = failure(["serve", "--host", "192.0.2.1", "--port", "0"], capsys)
    assert msg.startswith("qwen35 serve: error: cannot bind --host 192.0.2.1 --port 0: ")


def test_serve_runs_uvicorn_on_the_socket_it_bound_first(monkeypatch, capsys):
    import uvicorn

    seen = {}

    class FakeLLM:
        workers = None  # one process

        def __init__(self, model, **kwargs):
            # the port is bound before the model loads, but not yet listening: clients are refused, not kept waiting
            with socket.socket() as other, pytest.raises(OSError, match="Address already in use"):
                other.bind(("127.0.0.1", seen["port"]))
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", seen["port"]), timeout=5)
            seen["kwargs"] = kwargs

    def fake_run(server, sockets):
        seen["sockets"] = [s.getsockname() for s in sockets]
        server.started = True

    with socket.create_server(("127.0.0.1", 0)) as probe:  # a free port, released for the server to take
        seen["port"] = probe.getsockname()[1]
    monkeypatch.setattr("qwen35.llm.LLM", FakeLLM)
    app = SimpleNamespace(state=SimpleNamespace(metrics=SimpleNamespace(model_name="served")))
    monkeypatch.setattr("qwen35.serve.app.build_app", lambda llm, *a, **kw: app)
    monkeypatch.setattr("qwen35.serve.summary.startup_summary", lambda llm, name, url: seen.update(summary=(name, url)))
    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    assert main(["serve", "--port", str(seen["port"]), "--max-num-seqs", "3", "--quantization", "int4",
                 "--quantization-group-size", "64", "--no-enable-prefix-caching", "--state-snapshot-bytes", "0"]) == 0
    assert seen["kwargs"]["max_num_seqs"] == 3
    assert (seen["kwargs"]["quantization"], seen["kwargs"]["quantization_group_size"]) == ("int4", 64)
    assert (seen["kwargs"]["enable_prefix_caching"], seen["kwargs"]["state_snapshot_bytes"]) == (False, 0)
    assert seen["sockets"] == [("127.0.0.1", seen["port"])]
    assert seen["summary"] == ("served", f"http://127.0.0.1:{seen['port']}")  # printed once the model is loaded
    socket.create_server(("127.0.0.1", seen["port"])).close()  # released once the server returned


def test_forward_quantizes_the_embedded_model(capsys):
    """--quantization reaches the loader from the command line (and the backend runs the format)."""
    assert main(["forward", "--quantization", "int8", "--token-ids", "1,2,3"]) == 0
    out = capsys.readouterr().out
    assert "weights int8 (" in out and "top next-token ids" in out


def test_bad_constraint_flags_fail_before_loading(tmp_path, capsys, no_loading):
    assert failure(["generate", "--json-schema", '{"type":', "x"], capsys).endswith(
        "--json-schema: is not valid JSON: Expecting value: line 1 column 9 (char 8)")
    assert "No such file" in failure(["generate", "--grammar-file", str(tmp_path / "none.lark"), "x"], capsys)
    assert "not allowed with argument --regex" in usage_error(["generate", "--regex", "a", "--choice", "b", "x"],
                                                               capsys)


def test_generate_follows_a_regex_and_a_schema(tmp_path, capsys):
    """The constraint flags reach the engine: the embedded model's answers match them."""
    assert main(["generate", "--regex", "[a-c]{3}-[0-9]{2}", "--temperature", "0", "--max-tokens", "20", "Hi"]) == 0
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", capsys.readouterr().out.strip())
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}},
                                  "required": ["n"]}))
    assert main(["generate", "--json-schema-file", str(schema), "--seed", "3", "--max-tokens", "20", "--json",
                 "Hi"]) == 0
    out = json.loads(capsys.readouterr().out)["outputs"][0]
    assert out["finish_reason"] == "stop" and 0 <= json.loads(out["text"])["n"] <= 9
