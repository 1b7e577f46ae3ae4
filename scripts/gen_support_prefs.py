"""Write the bundled preference set `support-prefs` (for `lmforge prepare --dpo`, docs/finetune.md).

    python3 scripts/gen_support_prefs.py     # -> lmforge/datasets/support-prefs.jsonl

The same made-up IT help desk as `support-chat` (scripts/gen_support_chat.py, whose topics,
questions and answer style this script reuses): each pair asks one question and prefers the help
desk's answer (greeting line, the topic's numbered steps, `Category: ... | Priority: ...`) to a
worse one of three kinds, in turn:

  terse       a one-line brush-off with no steps ("Please restart your laptop and try again.")
  unformatted the right steps as one paragraph, without the greeting and the category line
  off-topic   the help desk's format, but another topic's steps and category

so a model tuned on it prefers complete, on-topic answers in the house format, and the reward
accuracy on held-out pairs shows whether it learned that. Every sentence was written for lmforge
(no external source; the same license as lmforge). Deterministic (random.Random(1)): running it
again writes the same file. Records are in TRL's conversational preference format: `prompt` a
message list (about half with the system message), `chosen` and `rejected` one assistant message each.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_support_chat as chat  # noqa: E402  (a sibling script: its topics and answer style)

TERSE = ["Please restart your {device} and try again.", "Have you tried turning it off and on again?",
         "That is a known issue, it should fix itself.", "Please open a ticket in the portal.",
         "I am not sure, maybe ask a colleague.", "Try again later."]
KINDS = ("terse", "unformatted", "off-topic")


def rejected(kind: str, topic: str, rng: random.Random) -> str:
    topics = sorted(chat.TOPICS)
    if kind == "terse":
        return chat.fill(rng.choice(TERSE), rng)
    if kind == "unformatted":
        steps = [chat.fill(s, rng) for s in chat.TOPICS[topic][3]]
        return " ".join(s[0].lower() + s[1:] if i else s for i, s in enumerate(steps))
    other = topics[(topics.index(topic) + rng.randint(1, len(topics) - 1)) % len(topics)]
    return chat.answer(other, rng)


def pair(i: int, topic: str, rng: random.Random) -> dict:
    prompt = [{"role": "system", "content": chat.SYSTEM}] if rng.random() < 0.5 else []
    prompt.append({"role": "user", "content": chat.question(topic, rng)})
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chat.answer(topic, rng)}],
            "rejected": [{"role": "assistant", "content": rejected(KINDS[i % len(KINDS)], topic, rng)}]}


def main() -> None:
    rng = random.Random(1)
    topics = sorted(chat.TOPICS)
    records = [pair(i, topics[i % len(topics)], rng) for i in range(240)]
    rng.shuffle(records)
    out = chat.ROOT / "lmforge" / "datasets" / "support-prefs.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records)} preference pairs to {out}")


if __name__ == "__main__":
    main()
