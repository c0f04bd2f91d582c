"""Hostile chat templates (the checkpoint's code) cannot take unbounded time or memory: each stops fast with a
TemplateLimitError naming the bound it hit."""

from __future__ import annotations

import resource
import time

import pytest

from qwen35.chat import template as chat_template
from qwen35.chat.template import ChatTemplate, TemplateLimitError

MESSAGES = [{"role": "user", "content": "hi"}]

HOSTILE = {
    "nested ranges": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                      "took longer"),
    "nested loops, no calls": ("{% set xs = range(100000)|list %}{% for a in xs %}{% for b in xs %}{% endfor %}"
                               "{% endfor %}", "took longer"),
    "big range": ("{{ range(10**9)|length }}", "a range would hold"),
    "string repetition": ("{{ 'x' * 10**10 }}", "a repeated string"),
    "list repetition": ("{{ ([1] * 10**9)|length }}", "a repeated list"),
    "huge power": ("{{ 10 ** 1000000 }}", "bits"),
    "doubling in a namespace": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                                "{% endfor %}{{ ns.s|length }}", "concatenation"),
    "doubling by recursion": ("{% macro f(s, n) %}{% if n %}{{ f(s + s, n - 1) }}{% endif %}{% endmacro %}"
                              "{{ f('x', 64) }}", "a joined string"),
    "wide center": ("{{ 'x'|center(10**10) }}", "filter 'center'"),
    "wide ljust": ("{{ 'x'.ljust(10**10) }}", r"str\.ljust"),
    "wide format": ("{{ '%10000000000d' % 1 }}", "format width"),
    "wide str.format": ("{{ '{:>10000000000}'.format(1) }}", "format width"),
    "replace amplifies": ("{% set s = 'x' * 100000 %}{{ s.replace('', s)|length }}", "a replaced string"),
    "join amplifies": ("{{ range(100000)|join('x' * 100000) }}", "a joined string"),
    "wordwrap amplifies": ("{{ ('x ' * 100000)|wordwrap(1, true, 'y' * 1000) }}", "a wrapped string"),
    "split into a huge list": ("{% set s = ' ' * 10**7 %}{{ (s.split(' ') + s.split(' '))|length }}", r"split\(\)"),
    "indent amplifies": ("{{ ('\\n' * 100000)|indent(100000) }}", "an indented string"),
    "tojson of a repeated tree": ("{% set a = [messages] * 100000 %}{% set b = [a] * 100000 %}{{ b|tojson }}",
                                  "items"),
    "output size": ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", "the rendered prompt"),
}


@pytest.mark.parametrize("source, message", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_template_stops_fast(source, message, monkeypatch):
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 1.0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(TemplateLimitError, match=message):
        ChatTemplate(source).render(MESSAGES)
    assert time.monotonic() - start < 3.0
    # ru_maxrss is the peak in KiB: no hostile template may have pushed it up by more than ~300 MB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 300_000


def test_limit_error_names_the_template_line():
    with pytest.raises(TemplateLimitError, match=r"template line 2"):
        ChatTemplate("ok\n{{ 'x' * 10**10 }}").render(MESSAGES)


def test_bounds_leave_ordinary_templates_alone():
    source = ("{% set ns = namespace(n=0) %}{% for m in messages * 3 %}{% set ns.n = ns.n + 1 %}"
              "{{ '%05d|%s' % (ns.n, m.content|center(6)) ~ ('-' * 3) }}{% endfor %}"
              "{{ '{:>4}'.format(7) }}{{ messages|tojson }}{{ 2 ** 10 }}{{ 'a\\tb'.expandtabs(4) }}")
    assert ChatTemplate(source).render(MESSAGES) == (
        "00001|  hi  ---00002|  hi  ---00003|  hi  ---   7" '[{"role": "user", "content": "hi"}]1024a   b')
