"""Placeholder expansion and 3D (T, H, W) positions for prompts with images and videos.

A prompt arrives with one `<|image_pad|>` per image and one `<|vision_start|><|video_pad|><|vision_end|>` (or a bare
`<|video_pad|>`) per video, as the chat template writes them. Each image pad becomes one pad per merged token; each
video becomes, per temporal patch, `<{t:.1f} seconds><|vision_start|>` + pads + `<|vision_end|>` (the timestamp
tokenised on its own, as vLLM does). Positions follow transformers' `get_rope_index`: text advances by one per
token; a vision block of mh x mw merged tokens starting at `cur` gets T = cur, H = cur + row, W = cur + col and
moves `cur` on by max(mh, mw). Decode positions are `index + rope_delta`. Positions are computed once for the whole
prompt, so chunked prefill and recompute after preemption slice the same array, as transformers'
`get_rope_index` computes them.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class MultimodalPrompt:
    """What the engine keeps for a request with visual items.

    The vision tower may encode the items over several steps, in prompt order: the scheduler grants encoder work
    in patches (`granted`) and prefills only the positions before the first item not yet fully granted; the runner
    does the granted work (`encoded_items`, `job`) before that step's forward."""

    items: list  # VisualItems in prompt order; each dropped (None) once its encoding starts
    grids: list[tuple[int, int, int]]
    positions: torch.Tensor  # [3, num_prompt_tokens] int64
    rope_delta: int  # decode position = token index + rope_delta
    feature_rows: torch.Tensor  # [num_prompt_tokens] int64: row of `embeds` for a placeholder, -1 for text
    item_starts: list[int] = field(default_factory=list)  # position of each item's first placeholder
    digests: list[bytes] = field(default_factory=list)  # each item's content hash (VisualItem.digest)
    row_ends: list[int] = field(default_factory=list)  # item k's rows of `embeds` end at row_ends[k]
    embeds: torch.Tensor | None = None  # [num_visual_tokens, hidden], filled item by item as the tower finishes them
    granted: int = 0  # patches of tower work granted so far (scheduler)
    encoded_items: int = 0  # items whose embeddings are in `embeds` (runner)
    job: object | None = None  # the vision tower's EncodeJob of the item being encoded (runner)

    @property
    def num_prompt_tokens(self) -> int:
        return self.positions.shape[1]

    @property
    def item_patches(self) -> list[int]:
        return [t * h * w for t, h, w in self.grids]

    @property
    def num_patches(self) -> int:
        return sum(self.item_patches)

    def patches_before(self, end: int) -> int:
        """Patches of every item with a placeholder before position `end`: the work prefilling up to it needs."""
        return sum(p for p, start in zip(self.item_patches, self.item_starts) if start < end)

    def ready_end(self, granted: int) -> int:
        """How far the prompt can be prefilled once `granted` patches of work are done: up to the first placeholder
        of the first item not wholly covered."""
        for p, start in zip(self.item_patches, self.item_starts):
            granted -= p
            if granted < 0:
                return start
        return self.num_prompt_tokens

    def items_in(self, start: int, end: int) -> bytes:
        """The digests of the items with a placeholder among positions start..end-1 (for the prefix cache's block
        hashes: equal token ids with other pixels are other content)."""
        rows = self.feature_rows[start:end]
        rows = rows[rows >= 0]
        if not rows.numel():
            return b""
        first, last = bisect_right(self.row_ends, int(rows.min())), bisect_right(self.row_ends, int(rows.max()))
        return b"".join(self.digests[first:last + 1])

    def positions_for(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] positions of tokens start..end-1 (prompt or generated)."""
        L = self.num_prompt_tokens
        parts = []
        if start < L:
            parts.append(self.positions[:, start:min(end, L)])
        if end > L:
            parts.append(torch.arange(max(start, L), end).add_(self.rope_delta).expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class VisionTokens:
    image: int
    video: int
    vision_start: int
    vision_end: int

    @staticmethod
    def of(model_config) -> "VisionTokens":
        c = model_config
        return VisionTokens(c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id)


def expand_prompt(token_ids: Sequence[int], images: Sequence, videos: Sequence, tokens: VisionTokens,
                  merge_size: int, encode: Callable[[str], list[int]]) -> tuple[list[int], MultimodalPrompt]:
    """Expand the placeholders of `token_ids` for the given processed items (k-th placeholder of a kind <-> k-th
    item of that kind). `encode` turns a timestamp string into token ids."""
    n_img = sum(1 for t in token_ids if t == tokens.image)
    n_vid = sum(1 for t in token_ids if t == tokens.video)
    if n_img != len(images) or n_vid != len(videos):
        raise ValueError(f"the prompt has {n_img} image and {n_vid} video placeholders but {len(images)} images and "
                         f"{len(videos)} videos were given (write one <|vision_start|><|image_pad|><|vision_end|> per "
                         "image and one <|vision_start|><|video_pad|><|vision_end|> per video, or use chat messages)")
    m2 = merge_size * merge_size
    out: list[int] = []
    blocks: list[tuple[int, int, int]] = []  # (start, mh, mw) of every vision block, in order
    ordered: list = []
    starts: list[int] = []  # first placeholder of each item
    next_img, next_vid = iter(images), iter(videos)
    i = 0
    while i < len(token_ids):
        tok = token_ids[i]
        if tok == tokens.image:
            item = next(next_img)
            _, h, w = item.grid_thw
            blocks.append((len(out), h // merge_size, w // merge_size))
            starts.append(len(out))
            out += [tokens.image] * (item.grid_thw[0] * h * w // m2)
            ordered.append(item)
        elif tok == tokens.video:
            item = next(next_vid)
            t, h, w = item.grid_thw
            if len(item.timestamps) != t:
                raise ValueError(f"a video with {t} temporal patches has {len(item.timestamps)} timestamps")
            wrapped = bool(out) and out[-1] == tokens.vision_start and i + 1 < len(token_ids) \
                and token_ids[i + 1] == tokens.vision_end
            if wrapped:  # the per-frame blocks bring their own start/end tokens
                out.pop()
                i += 1
            for k, stamp in enumerate(item.timestamps):
                out += encode(f"<{stamp:.1f} seconds>") + [tokens.vision_start]
                if k == 0:
                    starts.append(len(out))
                blocks.append((len(out), h // merge_size, w // merge_size))
                out += [tokens.video] * (h * w // m2)
                out.append(tokens.vision_end)
            ordered.append(item)
        else:
            out.append(tok)
        i += 1
    positions, delta, rows = _positions(len(out), blocks)
    grids = [tuple(int(x) for x in item.grid_thw) for item in ordered]
    row_ends = list(itertools.accumulate(item.num_tokens(merge_size) for item in ordered))
    return out, MultimodalPrompt(ordered, grids, positions, delta, rows, starts, [item.digest() for item in ordered],
                                 row_ends)


def _positions(L: int, blocks: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int, torch.Tensor]:
    pos = torch.empty(3, L, dtype=torch.int64)
    rows = torch.full((L,), -1, dtype=torch.int64)
    cur = at = row = 0
    for start, mh, mw in blocks:
        n = mh * mw
        pos[:, at:start] = torch.arange(cur, cur + start - at)
        cur += start - at
        pos[0, start:start + n] = cur
        pos[1, start:start + n] = cur + torch.arange(mh).repeat_interleave(mw)
        pos[2, start:start + n] = cur + torch.arange(mw).repeat(mh)
        rows[start:start + n] = torch.arange(row, row + n)
        cur += max(mh, mw)
        at, row = start + n, row + n
    pos[:, at:] = torch.arange(cur, cur + L - at)
    delta = int(pos.max()) + 1 - L if L else 0
    return pos, delta, rows
