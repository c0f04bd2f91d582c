"""`LLM.chat`: render the checkpoint's chat template, generate, and split each completion into reasoning, content
and tool calls, the way an OpenAI-compatible server reports them."""

from __future__ import annotations

from qwen35.chat.template import ChatPrompt, ChatTemplate, check_template_kwargs
from qwen35.multimodal.inputs import split_chat_media
from qwen35.chat.reasoning import is_thinking_prompt, split_reasoning
from qwen35.chat.tool_calls import parse_tool_calls


def render(llm, conversation, tools=None, chat_template_kwargs=None, add_generation_prompt=True,
           escape_special_tokens=False, continue_final_message=False) -> str:
    """The prompt text. escape_special_tokens: special-token strings inside the conversation, tools and kwargs (not
    the template's own markup) are marked so that `tokenizer.encode` turns them into plain-text ids.
    continue_final_message: the prompt ends right after the final message's content (no end-of-turn), so the model
    continues that message (as transformers and vLLM do it); it excludes add_generation_prompt."""
    tok = llm.tokenizer
    if tok is None or not tok.chat_template:
        raise ValueError(f"{llm.model_path}: the checkpoint has no chat template (chat_template.jinja or "
                         "tokenizer_config.json 'chat_template')")
    check_template_kwargs(chat_template_kwargs or {})  # before the call: a key like 'tools' would clash with it
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
    template = ChatTemplate(tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    final = None
    if continue_final_message:
        conversation, final = _tag_final(conversation)
    prompt = template.render(conversation, tools=tools, add_generation_prompt=add_generation_prompt,
                             literal_tokens=tok.special_tokens if escape_special_tokens else (),
                             **(chat_template_kwargs or {}))
    return prompt if final is None else _cut_at_tag(prompt, final)


def final_message_text(conversation) -> str:
    """The text of the last message (its text parts joined), '' when it has none."""
    content = conversation[-1].get("content") if conversation else None
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else ""


# continue_final_message as transformers' apply_chat_template (which vLLM uses) does it: this marker is appended to
# the final message's (last) text, the prompt rendered and cut where the marker starts, and trailing whitespace
# dropped when the template trimmed the marker's.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final(conversation) -> tuple[list, str]:
    """(the conversation with the marker after the final message's last text, that text)."""
    if not conversation:
        raise ValueError("continue_final_message: the conversation is empty")
    final = dict(conversation[-1])
    content = final.get("content")
    if isinstance(content, str):
        text = content
        final["content"] = content + _CONTINUE_TAG
    elif isinstance(content, list) and any(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        at = max(i for i, p in enumerate(content) if isinstance(p, dict) and isinstance(p.get("text"), str))
        text = content[at]["text"]
        final["content"] = content[:at] + [{**content[at], "text": text + _CONTINUE_TAG}] + content[at + 1:]
    else:
        raise ValueError("continue_final_message: the final message has no text to continue")
    return list(conversation[:-1]) + [final], text


def _cut_at_tag(prompt: str, final: str) -> str:
    at = prompt.rfind(_CONTINUE_TAG.strip())
    if at < 0 or final.strip() not in prompt:
        raise ValueError("continue_final_message: the final message does not appear in the rendered prompt as "
                         "written (the chat template changed or dropped it)")
    end = at if prompt.startswith(_CONTINUE_TAG, at) else len(prompt[:at].rstrip())
    spans = [(a, b) for a, b in getattr(prompt, "literal_spans", ()) if b <= end]
    return ChatPrompt(prompt[:end], spans) if spans else prompt[:end]


def assistant_message(text: str, thinking: bool, tools) -> dict:
    reasoning, content = split_reasoning(text, thinking=thinking)
    tool_calls = []
    if content and tools:
        parsed = parse_tool_calls(content, tools)
        content, tool_calls = parsed.content, parsed.tool_calls
    msg = {"role": "assistant", "content": content or None, "reasoning_content": reasoning}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


def chat(llm, messages, sampling_params=None, tools=None, chat_template_kwargs=None, add_generation_prompt=True,
         escape_special_tokens=False, continue_final_message=False):
    """messages: one conversation (a list of message dicts) or a list of conversations."""
    conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
    prompts, requests = [], []
    for c in conversations:
        c, images, videos = split_chat_media(c)  # media parts become the placeholders templates render
        prompt = render(llm, c, tools, chat_template_kwargs, add_generation_prompt, escape_special_tokens,
                        continue_final_message)
        prompts.append(prompt)
        # The template already wrote every special token; encode it as written, with no BOS added (Qwen adds none).
        requests.append({"prompt": prompt, "prompt_token_ids": llm.tokenizer.encode(prompt),
                         "multi_modal_data": {"image": images, "video": videos}})
    outputs = llm.generate(requests, sampling_params)
    for prompt, out in zip(prompts, outputs):
        thinking = is_thinking_prompt(prompt)
        out.messages = [assistant_message(c.text, thinking, tools) for c in out.outputs]
    return outputs
