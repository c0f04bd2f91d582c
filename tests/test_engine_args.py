"""EngineArgs is the one declaration of LLM's settings: LLM(**kwargs) is checked against it, and the command-line
flags of generate / chat / serve are generated from it (vLLM's names where they mean the same), reaching LLM intact.
Also the Python surface vLLM users expect: get_tokenizer, generate's progress line, SamplingParams.bad_words."""

import dataclasses
import json

import pytest

from qwen35 import LLM, SamplingParams
from qwen35.cli import main
from qwen35.engine_args import EngineArgs


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=256, max_num_seqs=4)


class Seen(Exception):
    """Raised by the stand-in LLM once it has the arguments, so no model loads and no server starts."""


@pytest.fixture
def seen(monkeypatch):
    got = {}

    def fake(model=None, **kwargs):
        got.update(model=model, **kwargs)
        raise Seen

    monkeypatch.setattr("qwen35.llm.LLM", fake)
    return got


def test_unknown_llm_keywords_name_the_closest_setting():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'max_num_seq'; did you mean max_num_seqs"):
        LLM(max_num_seq=4)


def test_every_cli_setting_is_a_flag_of_generate_chat_and_serve(capsys):
    cli = [f for f in dataclasses.fields(EngineArgs) if f.metadata["cli"]]
    for command in (["generate", "--help"], ["chat", "--help"], ["serve", "--help"]):
        with pytest.raises(SystemExit):
            main(command)
        text = capsys.readouterr().out
        for f in cli:
            if f.metadata["group"] == "media" and command[0] != "serve":
                continue
            assert "--" + f.name.replace("_", "-") in text, (command, f.name)
        assert "(default: 2048)" in text  # defaults are shown


def test_flags_reach_llm_under_vllms_names(seen, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0].content }}")
    with pytest.raises(Seen):
        main(["serve", "some/model", "--gpu-memory-utilization", "0.3", "--max-num-batched-tokens", "512",
              "--block-size", "32", "--max-num-seqs", "3", "--chat-template", str(template), "--generation-config",
              "vllm", "--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder", "--reasoning-parser", "qwen3",
              "--disable-log-requests", "--uvicorn-log-level", "warning", "--no-enable-prefix-caching",
              "--trust-remote-code", "--enforce-eager", "--disable-log-stats", "-tp", "2", "-ep", "--seed", "7",
              "--port", "0"])
    assert seen["model"] == "some/model"
    assert (seen["kv_cache_memory_fraction"], seen["max_num_batched_tokens"], seen["block_size"],
            seen["max_num_seqs"]) == (0.3, 512, 32, 3)
    assert (seen["chat_template"], seen["generation_config"], seen["enable_prefix_caching"], seen["seed"]) == (
        str(template), "vllm", False, 7)
    assert (seen["tensor_parallel_size"], seen["enable_expert_parallel"], seen["enforce_eager"]) == (2, True, True)
    assert EngineArgs.from_kwargs(**{k: v for k, v in seen.items() if k not in ("model", "revision")})


@pytest.mark.parametrize("argv, message", [
    (["serve", "--tool-call-parser", "hermes"], "argument --tool-call-parser: 'hermes' is not supported"),
    (["serve", "--reasoning-parser", "deepseek_r1"], "argument --reasoning-parser: 'deepseek_r1' is not supported"),
    (["serve", "--tensor-parallel-size", "0"], "argument --tensor-parallel-size/-tp: must be at least 1, got 0"),
    (["serve", "--gpu-memory-utilization", "1.5"], "argument --kv-cache-memory-fraction/--gpu-memory-utilization: "
                                                   "must be in (0, 1], got 1.5"),
])
def test_unsupported_vllm_values_are_usage_errors(argv, message, capsys, seen):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_model_given_twice_must_agree(seen, capsys):
    assert main(["serve", "a", "--model", "b", "--port", "0"]) == 2
    assert "give the model once" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("qwen35 ")


def test_chat_template_and_generation_config_sources(tmp_path):
    inline = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    llm = LLM(chat_template=inline, generation_config="vllm", max_model_len=64, max_num_seqs=1)
    assert llm.get_tokenizer() is llm.tokenizer and llm.tokenizer.chat_template == inline
    assert llm.generation_config == {} and llm.get_default_sampling_params() == SamplingParams()
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 7}))
    llm = LLM(generation_config=str(folder), max_model_len=64, max_num_seqs=1)
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.top_k) == (0.3, 7)
    assert llm.tokenizer.eos_token_ids  # stop ids still come from the checkpoint
    with pytest.raises(ValueError, match="not 'auto', 'vllm' or a folder"):
        LLM(generation_config=str(tmp_path / "none"), max_model_len=64, max_num_seqs=1)
    with pytest.raises(ValueError, match="no such file, and not a Jinja template"):
        LLM(chat_template=str(tmp_path / "missing.jinja"), max_model_len=64, max_num_seqs=1)


def test_bad_words_are_never_generated(llm):
    prompt = {"prompt": "The list type in Python"}
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    word = " statement" if " statement" in free.text else free.text.split()[1]
    banned = [llm.tokenizer.encode(w) for w in (word.strip(), " " + word.strip())]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                              bad_words=[word]))[0].outputs[0]

    def contains(ids, seq):
        return any(ids[i:i + len(seq)] == seq for i in range(len(ids) - len(seq) + 1))

    assert any(contains(free.token_ids, s) for s in banned)  # the word is what the model would write
    assert not any(contains(out.token_ids, s) for s in banned)
    assert out.token_ids != free.token_ids


def test_bad_words_are_checked():
    with pytest.raises(ValueError, match="bad_words must be a list of non-blank strings"):
        SamplingParams(bad_words=["ok", " "])


def test_generate_progress_only_on_a_terminal(llm, capsys, monkeypatch):
    prompts = [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5]}]
    llm.generate(prompts, SamplingParams(max_tokens=2))
    assert capsys.readouterr().err == ""  # stderr is not a terminal here
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    llm.generate(prompts, SamplingParams(max_tokens=2))
    assert "Processed prompts: 2/2" in capsys.readouterr().err
    llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    assert capsys.readouterr().err == ""


def test_a_missing_max_tokens_is_the_room_left_capped_by_the_generation_config(tmp_path):
    llm = LLM(max_model_len=64, max_num_seqs=1)
    e = llm.engine
    assert (e.max_new_tokens(10, None), e.max_new_tokens(10, 5)) == (54, 5)
    out = llm.generate({"prompt_token_ids": list(range(1, 11))}, SamplingParams(max_tokens=None, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 54 and out[0].outputs[0].finish_reason == "length"
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    e = LLM(generation_config=str(folder), max_model_len=64, max_num_seqs=1).engine
    assert (e.max_new_tokens(10, None), e.max_new_tokens(60, None), e.max_new_tokens(10, 20)) == (7, 4, 20)
