"""Function sources the integration tests deploy (as {file name: content})."""

from __future__ import annotations

from pathlib import Path

DICE_DIR = Path(__file__).resolve().parents[2] / "examples" / "runtimes" / "python" / "dice"
DICE = {name: (DICE_DIR / name).read_text() for name in ("test.py", "requirements.txt")}

ECHO = {"handler.py": "def handler(params):\n    return {'echo': params}\n"}

# Sleeps params["s"] seconds; returns when it ran (wall clock inside the container) and its pid.
SLOW = {
    "handler.py": (
        "import os, time\n"
        "def handler(params):\n"
        "    start = time.time()\n"
        "    time.sleep(params.get('s', 1))\n"
        "    return {'start': start, 'end': time.time(), 'pid': os.getpid()}\n"
    )
}

# Misbehaves on request: raise, _exit, sleep, fill its directory, nest directories deep, a result nested n levels
# deep or n bytes long, print.
CHAOS = {
    "handler.py": (
        "import os, sys, time\n"
        "def handler(params):\n"
        "    what = params.get('do')\n"
        "    if what == 'raise':\n"
        "        raise ValueError('bad dice: ' + str(params.get('why')))\n"
        "    if what == 'exit':\n"
        "        os._exit(3)\n"
        "    if what == 'sleep':\n"
        "        time.sleep(params['s'])\n"
        "    if what == 'fill':\n"
        "        with open('fill.bin', 'wb') as f:\n"
        "            f.write(b'x' * (params['mb'] << 20))\n"
        "        time.sleep(params['s'])\n"
        "    if what == 'dirs':\n"
        "        for i in range(params['n']):\n"
        "            os.mkdir('d%d' % i)\n"
        "        time.sleep(params['s'])\n"
        "    if what == 'nest':\n"
        "        fd = os.open('.', os.O_RDONLY)\n"
        "        for _ in range(params['n']):\n"
        "            os.mkdir('n', dir_fd=fd)\n"
        "            inner = os.open('n', os.O_RDONLY, dir_fd=fd)\n"
        "            os.close(fd)\n"
        "            fd = inner\n"
        "        os.close(fd)\n"
        "        time.sleep(params['s'])\n"
        "        return 'nested'\n"
        "    if what == 'big':\n"
        "        return 'x' * params['n']\n"
        "    if what == 'deep':\n"
        "        nested = []\n"
        "        for _ in range(params['n'] - 1):\n"
        "            nested = [nested]\n"
        "        return nested\n"
        "    if what == 'fds':\n"
        "        print('py'); os.write(1, b'fd\\n'); os.system('echo child; echo child-err >&2')\n"
        "        return 'fds'\n"
        "    print('to stdout'); print('to stderr', file=sys.stderr)\n"
        "    return {'ok': True, 'pid': os.getpid()}\n"
    )
}

# Writes the bytes it is given onto the runner's socket (it shares the runner's process), then returns.
RUDE = {
    "handler.py": (
        "import os, stat\n"
        "def handler(params):\n"
        "    for fd in range(3, 256):\n"
        "        try:\n"
        "            if stat.S_ISSOCK(os.fstat(fd).st_mode):\n"
        "                os.write(fd, bytes.fromhex(params['hex']))\n"
        "        except OSError:\n"
        "            pass\n"
        "    return 'after the bytes'\n"
    )
}

# What a function can do to its runner from inside its process: close the runner's socket and work on, or undo
# the runner's bound on results and return a larger one.
HOSTILE = {
    "handler.py": (
        "import os, stat, sys, time\n"
        "def handler(params):\n"
        "    what = params.get('do')\n"
        "    if what == 'unplug':\n"
        "        for fd in range(3, 256):\n"
        "            try:\n"
        "                if stat.S_ISSOCK(os.fstat(fd).st_mode):\n"
        "                    os.close(fd)\n"
        "            except OSError:\n"
        "                pass\n"
        "        time.sleep(params['s'])\n"
        "    if what == 'bloat':\n"
        "        sys.modules['__main__'].MAX_RESULT_MESSAGE = 1 << 40\n"
        "        return 'x' * params['n']\n"
        "    return 'fine'\n"
    )
}

# A command that leaves a process behind outside its session (the group kill after a command misses it).
ESCAPE = {"escape.py": (
    "import subprocess, sys\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True,\n"
    "                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "print('escaped')\n")}

# The fourth seed's style: a plain string argument as argv[1], stdout as the result.
UPPER = {"upper.py": "import sys\nprint(sys.argv[1].upper())\n"}
