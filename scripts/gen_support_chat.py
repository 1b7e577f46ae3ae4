"""Write the bundled SFT example set `support-chat` and its chat evaluation task.

    python3 scripts/gen_support_chat.py      # -> lmforge/datasets/support-chat.jsonl, lmforge/tasks/support-chat-gen.jsonl

A made-up company's IT help desk ("Northwind IT") answering in one fixed style: a greeting line,
numbered steps, and a `Category: ... | Priority: ...` line. Every sentence here was written for
lmforge (no external source; the same license as lmforge). The style is the point: a model
fine-tuned on it visibly changes how it answers (docs/finetune.md, tests/test_sft.py), and the
held-out loss on the answers falls within a few steps.

Deterministic (random.Random(0)): running it again writes the same files. Records are in TRL's
`messages` format; about half carry a system message, about a fifth have a second user turn
(every assistant turn is trained, not just the last).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GREETING = "Thanks for contacting Northwind IT."
SYSTEM = "You are the Northwind IT help desk assistant. Answer in the help desk's format."

# topic: (category, priority, questions with {device}/{place}/{when} slots, three steps, escalation)
TOPICS: dict[str, tuple[str, str, list[str], list[str], str]] = {
    "vpn-drops": ("Network", "Normal", [
        "My VPN drops every hour, what do I do?",
        "The VPN keeps disconnecting on my {device} when I work from {place}.",
        "VPN connection falls over {when}, any idea why?",
        "Why does GlobalConnect disconnect me every 60 minutes?",
    ], ["Update the GlobalConnect client from the Software Center.",
        "Turn off power saving for the network adapter on your {device}.",
        "Reconnect and choose the nearest gateway (EU-West for most offices)."],
        "collect the log with GlobalConnect > Help > Export logs and attach it to this ticket"),
    "password-reset": ("Accounts", "Normal", [
        "I forgot my password, how can I reset it?",
        "How do I change my Windows password?",
        "My password expired {when} and I cannot log in.",
        "I need a new password for my Northwind account.",
    ], ["Open password.northwind.example from any browser.",
        "Confirm your identity with the code sent to your registered phone.",
        "Choose a new password of at least 14 characters and sign in again on your {device}."],
        "call the service desk on extension 4357 to verify your identity by phone"),
    "printer": ("Hardware", "Low", [
        "The printer on the third floor is not printing.",
        "My print jobs get stuck in the queue.",
        "I can't print from my {device}.",
        "Printing to FollowMe does nothing {when}.",
    ], ["Check that you picked the FollowMe queue, not a single printer.",
        "Tap your badge on any printer to release the job.",
        "If the job stays in the queue, remove it and print again."],
        "tell us the printer's asset number (on the sticker at the front)"),
    "email-sync": ("Email", "Normal", [
        "My work email stopped syncing on my phone.",
        "Outlook on my phone shows no new mail since {when}.",
        "Email is not updating on my mobile.",
        "My phone asks for my email password again and again.",
    ], ["Remove the Northwind account from the Outlook app.",
        "Add it again and approve the sign-in in the Authenticator app.",
        "Wait five minutes for the first sync to finish."],
        "send us the phone model and its system version"),
    "slow-laptop": ("Hardware", "Low", [
        "My {device} is very slow.",
        "Everything takes ages to open on my computer {when}.",
        "My laptop fan is loud and apps freeze.",
        "The computer got slow after the last update.",
    ], ["Restart the {device} (a restart, not sleep) to finish pending updates.",
        "Close browser tabs you do not need; each one uses memory.",
        "Run Software Center > Health check and install what it lists."],
        "we will book a hardware check at the {office} office desk"),
    "lost-2fa": ("Accounts", "High", [
        "I lost my phone and can't approve sign-ins.",
        "I got a new phone, how do I move my Authenticator?",
        "My two-factor app is gone after a reset.",
        "I cannot get past the MFA prompt {when}.",
    ], ["Call the service desk on extension 4357 from a colleague's phone.",
        "We verify your identity and issue a temporary access code.",
        "Sign in with the code and register the Authenticator app on the new phone."],
        "report the lost phone to security@northwind.example as well"),
    "shared-drive": ("Access", "Normal", [
        "I need access to the Finance shared drive.",
        "I get 'access denied' on the Projects folder.",
        "How do I get into my team's shared drive?",
        "The shared drive disappeared from my {device} {when}.",
    ], ["Ask the folder owner to approve you in the Access portal.",
        "Once approved, sign out and in again so your groups refresh.",
        "Map the drive again with Software Center > Map drives."],
        "name the folder path and your manager in a reply"),
    "software-install": ("Software", "Low", [
        "Can I install Python on my laptop?",
        "I need Visio for a project.",
        "How do I get new software on my {device}?",
        "Please install Zoom for me.",
    ], ["Open Software Center on your {device}.",
        "Search for the application and select Install.",
        "If it is not listed, request it with the New software form."],
        "licensed software needs your manager's approval in the request"),
    "meeting-wifi": ("Network", "Normal", [
        "The Wi-Fi in meeting room B is terrible.",
        "Guests cannot connect to our Wi-Fi.",
        "My {device} does not see the office Wi-Fi {when}.",
        "Wi-Fi keeps dropping in the {office} office.",
    ], ["Connect to NW-Staff, not NW-Guest, with your Northwind login.",
        "Guests get a day pass from reception for NW-Guest.",
        "Forget the network on your {device} and join again if it still fails."],
        "tell us the room name so facilities can check the access point"),
    "locked-account": ("Accounts", "High", [
        "My account is locked.",
        "It says my account is locked out after too many attempts.",
        "I'm locked out of everything {when}.",
        "Can you unlock my user account?",
    ], ["Wait 15 minutes; the lock releases on its own.",
        "Sign in once with your current password, slowly.",
        "If it locks again, reset the password at password.northwind.example."],
        "an old password saved on a phone often causes this: remove it there"),
    "call-audio": ("Software", "Normal", [
        "People can't hear me in Teams calls.",
        "My headset microphone does not work in meetings.",
        "Audio is choppy in video calls {when}.",
        "Nobody hears me when I join from my {device}.",
    ], ["In Teams, open Settings > Devices and pick your headset as microphone.",
        "Make a test call to check the level.",
        "Unplug and replug the headset if it is not listed."],
        "try another headset from the {office} office desk to rule out the hardware"),
    "phishing": ("Security", "High", [
        "I got a suspicious email asking for my password.",
        "I think I clicked a phishing link.",
        "Is this email from the CEO real? It asks for gift cards.",
        "Someone sent me an invoice I never asked for.",
    ], ["Do not reply or open any attachment.",
        "Use the Report phishing button in Outlook.",
        "If you entered your password, change it now at password.northwind.example."],
        "security will contact you within the hour if they need more"),
    "new-starter": ("Onboarding", "Normal", [
        "A new colleague starts on Monday, what do they need?",
        "How do I order a laptop for a new hire?",
        "Our intern has no account yet.",
        "What is the process for onboarding a new employee?",
    ], ["Submit the New starter form at least five working days before the start.",
        "We prepare the account, the {device} and the badge.",
        "The new colleague collects everything at the {office} office desk on day one."],
        "late requests are handled as soon as HR confirms the contract"),
    "disk-full": ("Hardware", "Low", [
        "My disk is full.",
        "Windows says I'm low on storage.",
        "I can't save files, the drive is full {when}.",
        "How do I free space on my {device}?",
    ], ["Empty the Downloads folder and the recycle bin.",
        "Move large files to OneDrive and mark them online-only.",
        "Run Software Center > Disk cleanup."],
        "we can swap the drive for a larger one if that is not enough"),
}
DEVICES = ["laptop", "ThinkPad", "MacBook", "desktop", "Surface", "work laptop"]
PLACES = ["home", "the Leeds office", "a hotel", "the Berlin office", "the London office", "a client site"]
OFFICES = ["Leeds", "Berlin", "London"]
WHENS = ["since this morning", "since yesterday", "after the update", "every afternoon", "since Monday", "today"]
OPENERS = ["", "Hi, ", "Hello, ", "Hey, ", "Good morning, ", "Quick question: "]
FOLLOWUPS = ["Thanks! And if that doesn't work?", "That didn't help, what now?", "Still broken after that.",
             "What if it happens again?"]


def fill(text: str, rng: random.Random) -> str:
    return text.format(device=rng.choice(DEVICES), place=rng.choice(PLACES), when=rng.choice(WHENS), office=rng.choice(OFFICES))


def answer(topic: str, rng: random.Random) -> str:
    category, priority, _, steps, _ = TOPICS[topic]
    lines = [GREETING] + [f"{i}. {fill(s, rng)}" for i, s in enumerate(steps, 1)]
    return "\n".join(lines + [f"Category: {category} | Priority: {priority}"])


def follow_up(topic: str, rng: random.Random) -> str:
    category, _, _, _, escalation = TOPICS[topic]
    return "\n".join([GREETING, f"1. Then {fill(escalation, rng)}.", "2. We will get back to you within one working day.",
                      f"Category: {category} | Priority: High"])


def question(topic: str, rng: random.Random) -> str:
    q = fill(rng.choice(TOPICS[topic][2]), rng)
    opener = rng.choice(OPENERS)
    return opener + (q[0].lower() + q[1:] if opener and not q.startswith("I ") and not q.startswith("I'") else q)


def conversation(topic: str, rng: random.Random) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    messages += [{"role": "user", "content": question(topic, rng)}, {"role": "assistant", "content": answer(topic, rng)}]
    if rng.random() < 0.2:
        messages += [{"role": "user", "content": rng.choice(FOLLOWUPS)}, {"role": "assistant", "content": follow_up(topic, rng)}]
    return {"messages": messages}


def main() -> None:
    rng = random.Random(0)
    topics = sorted(TOPICS)
    records = [conversation(topics[i % len(topics)], rng) for i in range(336)]
    rng.shuffle(records)
    out = ROOT / "lmforge" / "datasets" / "support-chat.jsonl"
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    # held-out questions (written differently from the training ones) for `lmforge eval --tasks support-chat-gen`
    held_out = ["My VPN disconnects all the time on the train.", "How do I reset a forgotten password?",
                "The office printer ignores my documents.", "Teams can't find my microphone.",
                "I received an email that looks like a scam.", "Outlook on my iPhone is not getting mail.",
                "Please give me access to the HR folder.", "My laptop has no space left."]
    items = [{"type": "gen", "chat": True, "context": q, "target": GREETING, "stop": ["\n"], "max_tokens": 16}
             for q in held_out]
    task = ROOT / "lmforge" / "tasks" / "support-chat-gen.jsonl"
    task.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    print(f"wrote {len(records)} conversations to {out} and {len(items)} items to {task}")


if __name__ == "__main__":
    main()
