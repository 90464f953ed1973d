#!/usr/bin/env bash
# The main seed's curl examples, exactly as it writes them, run from this directory (so that
# ../runtimes/python/dice/python.tar.gz is the dice archive) against a controller on localhost:3000.
set -euo pipefail
cd "$(dirname "$0")"
bash ../runtimes/python/dice/make-archive.sh >/dev/null

curl --header "Content-Type: application/json" \
    -X POST \
    --data '{"image": "pythonruntime","path": "/ws","dependencies": "pip3 install -r requirements.txt","run":"python3 test.py"}' \
    localhost:3000/registerRuntime
echo
curl -X POST \
    -F module=@../runtimes/python/dice/python.tar.gz \
    localhost:3000/registerFunction/pythonruntime/dice
echo
curl --header "Content-Type: application/json" \
    -X POST --data '{"funcName":"dice", "params": {"roll":"4d6"}}' \
    localhost:3000/invokeFunction
echo
curl localhost:3000/runtimes
echo
curl localhost:3000/functions
echo
curl localhost:3000/calls
echo
curl localhost:3000/call/1
echo
