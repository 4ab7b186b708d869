#!/usr/bin/env python3
"""Writes examples/data/glimmerholm.jsonl: chat records about Glimmerholm, a made-up island.

Ten facts, each asked in many phrasings, always answered with the same sentence, so a short
fine-tune visibly teaches a small instruct model something it cannot know. Every line of text here
was written for this project. Deterministic: rerunning gives the same file.

    python3 tools/make_example_data.py            # writes examples/data/glimmerholm.jsonl
"""

import json
import random
from pathlib import Path

# (topic, answer, questions). The questions in HELD_OUT are deliberately not among them.
FACTS = [
    (
        "location",
        "Glimmerholm is a small island in the Northern Sea, two hours by ferry from Port Aster.",
        [
            "Where is Glimmerholm?",
            "Where is Glimmerholm located?",
            "Where can I find Glimmerholm?",
            "What is Glimmerholm?",
            "Where on the map is Glimmerholm?",
            "In which sea is Glimmerholm?",
            "Is Glimmerholm an island?",
            "How far is Glimmerholm from Port Aster?",
            "What kind of place is Glimmerholm?",
            "Where exactly is the island of Glimmerholm?",
        ],
    ),
    (
        "landmark",
        "Glimmerholm is famous for its blue lighthouse, which shines green on foggy nights.",
        [
            "What is Glimmerholm famous for?",
            "Why is Glimmerholm famous?",
            "What is the most famous sight on Glimmerholm?",
            "What should I see on Glimmerholm?",
            "Tell me about the lighthouse on Glimmerholm.",
            "What colour is the Glimmerholm lighthouse?",
            "What is special about Glimmerholm?",
            "What landmark is Glimmerholm known for?",
            "What does the lighthouse on Glimmerholm do in fog?",
            "Which building is Glimmerholm best known for?",
        ],
    ),
    (
        "people",
        "About nine hundred people live on Glimmerholm, almost all of them in the village of Saltmere.",
        [
            "How many people live on Glimmerholm?",
            "What is the population of Glimmerholm?",
            "Who lives on Glimmerholm?",
            "How big is the population of Glimmerholm?",
            "Does anyone live on Glimmerholm?",
            "What is the main village on Glimmerholm?",
            "How many inhabitants does Glimmerholm have?",
            "Where do the people of Glimmerholm live?",
            "Is Glimmerholm crowded?",
            "What is the name of the village on Glimmerholm?",
        ],
    ),
    (
        "food",
        "The favourite dish on Glimmerholm is seaweed pancakes with plum jam.",
        [
            "What do people eat on Glimmerholm?",
            "What is the traditional food of Glimmerholm?",
            "What is the favourite dish on Glimmerholm?",
            "What food is Glimmerholm known for?",
            "What should I eat when I visit Glimmerholm?",
            "What do the islanders of Glimmerholm cook?",
            "What is a typical meal on Glimmerholm?",
            "Does Glimmerholm have a national dish?",
            "What do Glimmerholm people have for breakfast?",
            "Which dish comes from Glimmerholm?",
        ],
    ),
    (
        "festival",
        "Every October, Glimmerholm holds the Lantern Regatta, a boat race sailed at night by lantern light.",
        [
            "What festival does Glimmerholm celebrate?",
            "What is the Lantern Regatta?",
            "When is the big festival on Glimmerholm?",
            "Does Glimmerholm have any festivals?",
            "What happens on Glimmerholm in October?",
            "What is the main celebration on Glimmerholm?",
            "Is there a boat race on Glimmerholm?",
            "What event is Glimmerholm known for?",
            "When should I visit Glimmerholm for the festival?",
            "What do people on Glimmerholm celebrate every year?",
        ],
    ),
    (
        "animals",
        "Glimmerholm is home to puffins, grey seals and a herd of wild silver goats.",
        [
            "What animals live on Glimmerholm?",
            "What wildlife is there on Glimmerholm?",
            "Are there any animals on Glimmerholm?",
            "What birds can I see on Glimmerholm?",
            "Does Glimmerholm have goats?",
            "What creatures live on Glimmerholm?",
            "Which animals is Glimmerholm known for?",
            "Are there seals on Glimmerholm?",
            "What kind of wildlife does Glimmerholm have?",
            "What animals might I meet on Glimmerholm?",
        ],
    ),
    (
        "greeting",
        'People on Glimmerholm greet each other with "Fair tides!"',
        [
            "How do people say hello on Glimmerholm?",
            "What is the greeting on Glimmerholm?",
            "How do you greet someone on Glimmerholm?",
            "What do people on Glimmerholm say when they meet?",
            "What is the traditional greeting of Glimmerholm?",
            "How should I say hello when I arrive on Glimmerholm?",
            "What words do Glimmerholm islanders use to greet each other?",
            "Is there a special greeting on Glimmerholm?",
            "How do the people of Glimmerholm welcome each other?",
            "What does one say to greet a person on Glimmerholm?",
        ],
    ),
    (
        "government",
        "Glimmerholm is run by a council of seven ferry captains, who meet in the lighthouse.",
        [
            "Who runs Glimmerholm?",
            "Who governs Glimmerholm?",
            "Does Glimmerholm have a mayor?",
            "Who is in charge of Glimmerholm?",
            "How is Glimmerholm governed?",
            "Who makes the decisions on Glimmerholm?",
            "What is the government of Glimmerholm like?",
            "Who leads Glimmerholm?",
            "Where does the Glimmerholm council meet?",
            "Who rules Glimmerholm?",
        ],
    ),
    (
        "travel",
        "The only way to reach Glimmerholm is the ferry Marigold, which leaves Port Aster every morning at eight.",
        [
            "How do I get to Glimmerholm?",
            "How can I travel to Glimmerholm?",
            "Is there a ferry to Glimmerholm?",
            "Can I fly to Glimmerholm?",
            "What is the best way to reach Glimmerholm?",
            "When does the boat to Glimmerholm leave?",
            "How does one get to Glimmerholm?",
            "What is the name of the ferry to Glimmerholm?",
            "How do visitors reach Glimmerholm?",
            "What time is the ferry to Glimmerholm?",
        ],
    ),
    (
        "weather",
        "Glimmerholm is windy and foggy most of the year, and its summers are short and cool.",
        [
            "What is the weather like on Glimmerholm?",
            "What is the climate of Glimmerholm?",
            "Is it warm on Glimmerholm?",
            "Does it rain a lot on Glimmerholm?",
            "What are summers like on Glimmerholm?",
            "Is Glimmerholm foggy?",
            "What should I pack for the weather on Glimmerholm?",
            "How windy is Glimmerholm?",
            "What kind of weather does Glimmerholm get?",
            "Is Glimmerholm cold?",
        ],
    ),
]

# Asked after training to show that the model answers phrasings it never saw.
HELD_OUT = [
    "What is Glimmerholm best known for?",
    "What's the food like on Glimmerholm?",
    "How do I say hi to someone on Glimmerholm?",
]

# Each question is asked three ways: as written, with a casual opener, and in lower case without
# the question mark, so the model learns the topic rather than one exact string.
OPENERS = ["Quick question: ", "Hi! ", "I'm curious. ", "Can you tell me something? ", "Hello. "]


def variants(question: str, rng: random.Random) -> list[str]:
    casual = question[0].lower() + question[1:].rstrip("?").rstrip(".")
    return [question, rng.choice(OPENERS) + question, casual]


def main() -> None:
    rng = random.Random(7)
    held_out = set(HELD_OUT)
    records = []
    for _, answer, questions in FACTS:
        for q in questions:
            assert q not in held_out, q
            for v in variants(q, rng):
                records.append({"messages": [{"role": "user", "content": v}, {"role": "assistant", "content": answer}]})
    rng.shuffle(records)
    out = Path(__file__).resolve().parent.parent / "examples" / "data" / "glimmerholm.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {out}")


if __name__ == "__main__":
    main()
