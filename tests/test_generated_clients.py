"""Any language gets a client from openapi/openapi.json. CI proves it for two: it generates
a Python client (openapi-python-client) and TypeScript types (openapi-typescript, used with
openapi-fetch), type-checks the example scripts of clients/examples/ against them
(`tsc --strict`, `mypy --strict`) and runs them against a live server.

The tools come from `.ci/run` (see the README's Clients section): a venv in .venv-clients
(or $BGJOBS_CLIENTS_VENV) and `npm ci` in clients/examples/typescript. Without them these
tests are skipped, saying why; with CI set they fail instead.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "openapi" / "openapi.json"
EXAMPLES = ROOT / "clients" / "examples"
TYPESCRIPT = EXAMPLES / "typescript"
NODE_BIN = TYPESCRIPT / "node_modules" / ".bin"
CLIENTS_VENV = Path(os.environ.get("BGJOBS_CLIENTS_VENV", ROOT / ".venv-clients"))
TOKEN = "client-example-token"
EXCEPTION = "SMTP server said 550: no such user"


def need(tool: Path | None, name: str, install: str) -> Path:
    """The tool, or a skip (a failure under CI) that says how to install it."""
    if tool is not None and tool.exists():
        return tool
    reason = f"{name} is missing: {install}"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the generated-client tests, but {reason}")
    pytest.skip(f"generated-client tests skipped: {reason}")


def run(command: list[str | Path], cwd: Path = ROOT, **env: str) -> str:
    """Run a step; its output is the failure message when it fails."""
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def serve(server_process: Any) -> Any:
    """A live server with API tokens, so the clients' bearer auth is exercised too."""
    return server_process(env={"BGJOBS_API_TOKENS": f"{TOKEN}=enqueue+work+read"})


def assert_walked_through(output: str, url: str) -> None:
    """The script printed what it did, in order, and the server's state agrees."""
    pattern = (
        r"enqueued (\w+) available\nacked \1 succeeded\n"
        r"enqueued (\w+) available\nfailed \2 failed\n"
        rf"listed failed \2: {re.escape(EXCEPTION)}\n"
    )
    match = re.fullmatch(pattern, output)
    assert match, output
    succeeded, failed = match.groups()
    assert succeeded != failed
    auth = {"Authorization": f"Bearer {TOKEN}"}
    job = httpx.get(f"{url}/jobs/{succeeded}", headers=auth).json()
    assert (job["state"], job["attempts"]) == ("succeeded", 1)
    listed = httpx.get(f"{url}/jobs/failed", headers=auth).json()["items"]
    assert [(j["id"], j["exception"], j["attempts"]) for j in listed] == [(failed, EXCEPTION, 1)]


def test_python_client_runs_against_a_live_server(server_process: Any, tmp_path: Path) -> None:
    install = "run .ci/run, or: python3 -m venv .venv-clients && "
    install += ".venv-clients/bin/pip install -r clients/examples/python/requirements.txt"
    generator = need(
        CLIENTS_VENV / "bin" / "openapi-python-client", "openapi-python-client", install
    )
    # The generator formats its output with the ruff of its own venv.
    path = f"{generator.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    output = tmp_path / "client"
    run([generator, "generate", "--path", SPEC, "--output-path", output], PATH=path)
    # The script type-checks against the generated package, as the TypeScript one does.
    python = generator.parent / "python"
    mypy = [Path(sys.executable).parent / "mypy", "--strict", "--python-executable", python]
    script = EXAMPLES / "python" / "main.py"
    run([*mypy, "--cache-dir", tmp_path / "mypy", script], MYPYPATH=str(output))
    with serve(server_process) as server:
        printed = run(
            [python, script],
            PYTHONPATH=str(output),
            BGJOBS_URL=server.url,
            BGJOBS_TOKEN=TOKEN,
        )
        assert_walked_through(printed, server.url)


def required_only(value: Any, schema: dict[str, Any], schemas: dict[str, Any]) -> Any:
    """An example value cut down to the fields its schema requires, at every depth."""
    if "$ref" in schema:
        return required_only(value, schemas[schema["$ref"].rsplit("/", 1)[1]], schemas)
    if isinstance(value, list):
        return [required_only(item, schema.get("items", {}), schemas) for item in value]
    if isinstance(value, dict):
        fields = schema.get("properties", {})
        required = list(schema.get("required", []))
        # A oneOf of required fields (a schedule's interval_ms or cron): the first branch
        # the example satisfies is required too.
        branches = [b.get("required", []) for b in schema.get("oneOf", [])]
        required += next((b for b in branches if all(k in value for k in b)), [])
        return {
            k: required_only(v, fields.get(k, {}), schemas)
            for k, v in value.items()
            if k in required
        }
    return value


def minimal_bodies(spec: dict[str, Any]) -> str:
    """TypeScript that gives every request body only its required fields: it type-checks
    only if openapi-typescript's default flags leave every other field optional."""
    schemas = spec["components"]["schemas"]
    lines = ['import type { paths } from "./schema.js";']
    cut = 0
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if "requestBody" not in operation:
                continue
            ref = operation["requestBody"]["content"]["application/json"]["schema"]
            example = schemas[ref["$ref"].rsplit("/", 1)[1]]["examples"][0]
            body = required_only(example, ref, schemas)
            cut += body != example
            kind = f'paths["{path}"]["{method}"]["requestBody"]["content"]["application/json"]'
            lines.append(f"export const {operation['operationId']}: {kind} = {json.dumps(body)};")
    assert cut >= 3, "the examples leave too few optional fields out to prove anything"
    return "\n".join(lines) + "\n"


def test_typescript_client_typechecks_and_runs(server_process: Any, tmp_path: Path) -> None:
    install = "run .ci/run, or: npm ci --prefix clients/examples/typescript (Node 20)"
    found = shutil.which("node")
    node = need(Path(found) if found else None, "node", install)
    tsc = need(NODE_BIN / "tsc", "typescript", install)
    project = tmp_path / "typescript"  # the committed project, plus what is generated
    project.mkdir()
    for name in ("package.json", "tsconfig.json", "main.ts"):
        shutil.copy(TYPESCRIPT / name, project / name)
    (project / "node_modules").symlink_to(TYPESCRIPT / "node_modules")
    run([NODE_BIN / "openapi-typescript", SPEC, "-o", "schema.d.ts"], cwd=project)
    (project / "minimal.ts").write_text(minimal_bodies(json.loads(SPEC.read_text())))
    run([tsc, "--strict", "--noEmit"], cwd=project)
    run([tsc, "--noCheck"], cwd=project)  # emit dist/*.js, already checked
    with serve(server_process) as server:
        printed = run(
            [node, "dist/main.js"], cwd=project, BGJOBS_URL=server.url, BGJOBS_TOKEN=TOKEN
        )
        assert_walked_through(printed, server.url)
