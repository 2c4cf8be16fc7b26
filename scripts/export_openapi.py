"""Write the app's OpenAPI spec to openapi/openapi.json, or check that it is current.

python scripts/export_openapi.py          # rewrite the committed spec
python scripts/export_openapi.py --check  # exit 1 if it differs from the app
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "openapi" / "openapi.json"
sys.path.insert(0, str(ROOT))


def render() -> str:
    from app.main import create_app

    return json.dumps(create_app().openapi(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the spec is stale")
    args = parser.parse_args()
    spec = render()
    if args.check:
        if not SPEC.exists() or SPEC.read_text() != spec:
            print(f"{SPEC} is stale: run python scripts/export_openapi.py", file=sys.stderr)
            return 1
        print(f"{SPEC} is current")
        return 0
    SPEC.write_text(spec)
    print(f"wrote {SPEC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
