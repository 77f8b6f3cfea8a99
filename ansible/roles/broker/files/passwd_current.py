"""Exit 0 when a Mosquitto password file holds exactly the wanted users and passwords.

Reads {"user": "password", ...} as JSON on stdin (never on the command line, where
other local users could see it) and the password file named by the first argument.
Exit status 1 means the file is missing or differs and must be rebuilt; Ansible uses
this to keep the play idempotent, since mosquitto_passwd salts every hash afresh.
"""

import base64
import hashlib
import hmac
import json
import sys


def matches(password: str, stored: str) -> bool:
    """Check a password against one of Mosquitto's hash formats ($6$ or $7$)."""
    parts = stored.split("$")
    if len(parts) == 4 and parts[1] == "6":
        salt = base64.b64decode(parts[2])
        digest = hashlib.sha512(password.encode() + salt).digest()
        return hmac.compare_digest(digest, base64.b64decode(parts[3]))
    if len(parts) == 5 and parts[1] == "7":
        salt = base64.b64decode(parts[3])
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
        return hmac.compare_digest(digest, base64.b64decode(parts[4]))
    return False


def main() -> int:
    wanted = json.load(sys.stdin)
    try:
        with open(sys.argv[1], encoding="utf-8") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except FileNotFoundError:
        return 1
    stored = dict(line.split(":", 1) for line in lines)
    if set(stored) != set(wanted):
        return 1
    return 0 if all(matches(wanted[u], stored[u]) for u in wanted) else 1


if __name__ == "__main__":
    sys.exit(main())
