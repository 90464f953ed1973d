"""The main seed's dice function: command style (`python3 test.py`), params as JSON on stdin.

Params: {"roll": "4d6"} -> prints the list of dice values, e.g. [4, 6, 4, 3].
"""

import json
import os
import sys

import dice  # from requirements.txt, installed offline into the container from the node's wheelhouse

raw = sys.stdin.read() or os.environ.get("SHOAL_PARAMS", "{}")
params = json.loads(raw) if raw.strip() else {}
expression = params.get("roll", "1d6") if isinstance(params, dict) else str(params)
values = dice.roll(expression)
print(json.dumps([int(v) for v in values], separators=(",", ":")))
