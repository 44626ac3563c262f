"""A small helm-compatible CLI over helm-sdkpy (Helm v4 as a shared library).

Run through tests/cluster/helm, which falls back to it when no real `helm` is on PATH.
Supported (the subset tests and the quickstart use):

  helm install RELEASE CHART [-n NS] [--create-namespace] [--set k=v]... [--set-string k=v]...
               [-f values.yaml]... [--wait] [--timeout 5m0s] [--version V] [--atomic]
  helm upgrade RELEASE CHART [--install] [same flags] [--reuse-values] [--reset-values]
  helm uninstall RELEASE [-n NS] [--wait] [--timeout 5m0s]
  helm status RELEASE [-n NS] [-o json|yaml]
  helm list [-n NS | -A] [-a] [-o json]
  helm get values RELEASE [-n NS] [-a] [-o json]
  helm history RELEASE [-n NS]      helm rollback RELEASE [REVISION]
  helm test RELEASE [-n NS]         helm lint CHART       helm version
Global flags: -n/--namespace, --kubeconfig, --kube-context, --debug.
`template` is not available: helm-sdkpy 0.1.32 has no template/dry-run entry point.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from typing import Any

import helm_sdkpy as helm

try:
    import yaml  # type: ignore
except ImportError:  # PyYAML may be absent in the venv: JSON is valid YAML for values files
    yaml = None


class UsageError(Exception):
    pass


# ------------------------------------------------------------------ --set parsing
def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, cur, i, depth = [], "", 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur += text[i : i + 2]
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth = max(0, depth - 1)
        if c == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _typed(value: str, as_string: bool) -> Any:
    if value.startswith("{") and value.endswith("}"):
        inner = value[1:-1]
        return [] if inner == "" else [_typed(v, as_string) for v in _split_unescaped(inner, ",")]
    value = _unescape(value)
    if as_string:
        return value
    if value in ("true", "false"):
        return value == "true"
    if value == "null":
        return None
    if re.fullmatch(r"-?(0|[1-9][0-9]*)", value):
        return int(value)
    return value


def _key_path(key: str) -> list[str | int]:
    path: list[str | int] = []
    for part in _split_unescaped(key, "."):
        m = re.fullmatch(r"(.*?)((\[\d+\])+)", part)
        if m:
            if m.group(1):
                path.append(_unescape(m.group(1)))
            path.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
        else:
            path.append(_unescape(part))
    return path


def _assign(values: dict, path: list[str | int], value: Any) -> None:
    node: Any = values
    for i, step in enumerate(path):
        last = i == len(path) - 1
        nxt: Any = None if last else ([] if isinstance(path[i + 1], int) else {})
        if isinstance(step, int):
            while len(node) <= step:
                node.append(None)
            if last:
                node[step] = value
            else:
                if not isinstance(node[step], (dict, list)):
                    node[step] = nxt
                node = node[step]
        else:
            if last:
                node[step] = value
            else:
                if not isinstance(node.get(step), (dict, list)):
                    node[step] = nxt
                node = node[step]


def apply_set(values: dict, expr: str, as_string: bool = False) -> None:
    for item in _split_unescaped(expr, ","):
        if not item:
            continue
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        _assign(values, _key_path(key), _typed(value, as_string))


def deep_merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def load_values_file(path: str) -> dict:
    with open(path, encoding="utf-8") if path != "-" else sys.stdin as f:
        text = f.read()
    if yaml is not None:
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: PyYAML is not installed, so values files must be JSON") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: values must be a mapping")
    return data


def parse_duration(text: str) -> int:
    """'5m0s', '300s', '2m', '1h', '90' -> seconds."""
    if re.fullmatch(r"\d+", text):
        return int(text)
    total, matched = 0.0, ""
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text):
        matched += num + unit
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    if matched != text:
        raise UsageError(f"invalid duration {text!r}")
    return max(1, int(total))


# ------------------------------------------------------------------ argument parsing
FLAGS_WITH_VALUE = {
    "-n", "--namespace", "--kubeconfig", "--kube-context", "--set", "--set-string",
    "-f", "--values", "--timeout", "--version", "-o", "--output", "--max-history",
}


def parse(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    positional: list[str] = []
    flags: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            positional.extend(argv[i + 1 :])
            break
        if a.startswith("-") and a != "-":
            name, eq, val = a.partition("=")
            if name in FLAGS_WITH_VALUE:
                if not eq:
                    if i + 1 >= len(argv):
                        raise UsageError(f"flag {name} needs a value")
                    val = argv[i + 1]
                    i += 1
                flags.setdefault(name, []).append(val)
            else:
                flags.setdefault(name, []).append(val if eq else "true")
        else:
            positional.append(a)
        i += 1
    return positional, flags


def flag(flags: dict, *names: str, default: str | None = None) -> str | None:
    for n in names:
        if n in flags:
            return flags[n][-1]
    return default


def bool_flag(flags: dict, *names: str) -> bool:
    v = flag(flags, *names)
    return v is not None and v.lower() not in ("false", "0")


def known(flags: dict, allowed: set[str]) -> None:
    common = {"-n", "--namespace", "--kubeconfig", "--kube-context", "--debug"}
    unknown = set(flags) - allowed - common
    if unknown:
        raise UsageError(f"unsupported flag(s) for this wrapper: {', '.join(sorted(unknown))}")


def collect_values(flags: dict) -> dict:
    values: dict = {}
    for path in flags.get("-f", []) + flags.get("--values", []):
        deep_merge(values, load_values_file(path))
    # helm applies --set after -f; keep the command-line order within each kind
    for expr in flags.get("--set", []):
        apply_set(values, expr)
    for expr in flags.get("--set-string", []):
        apply_set(values, expr, as_string=True)
    return values


def configuration(flags: dict) -> helm.Configuration:
    namespace = flag(flags, "-n", "--namespace") or os.environ.get("HELM_NAMESPACE") or "default"
    kubeconfig = flag(flags, "--kubeconfig") or os.environ.get("KUBECONFIG") or None
    if kubeconfig and os.pathsep in kubeconfig:
        kubeconfig = kubeconfig.split(os.pathsep)[0]
    return helm.Configuration(
        namespace=namespace, kubeconfig=kubeconfig, kubecontext=flag(flags, "--kube-context")
    )


def print_release(rel: Any, flags: dict) -> None:
    fmt = flag(flags, "-o", "--output")
    if fmt == "json":
        print(json.dumps(rel, indent=2, default=str))
        return
    if fmt == "yaml" and yaml is not None:
        print(yaml.safe_dump(rel, sort_keys=False))
        return
    if not isinstance(rel, dict):
        print(rel)
        return
    info = rel.get("info") if isinstance(rel.get("info"), dict) else {}
    chart = rel.get("chart")
    chart_name = ""
    if isinstance(chart, dict):
        meta = chart.get("metadata") if isinstance(chart.get("metadata"), dict) else chart
        chart_name = f"{meta.get('name', '')}-{meta.get('version', '')}".strip("-")
    print(f"NAME: {rel.get('name', '')}")
    print(f"NAMESPACE: {rel.get('namespace', '')}")
    print(f"STATUS: {info.get('status', rel.get('status', ''))}")
    print(f"REVISION: {rel.get('version', rel.get('revision', ''))}")
    if chart_name:
        print(f"CHART: {chart_name}")
    if info.get("notes"):
        print("NOTES:\n" + info["notes"])


# ------------------------------------------------------------------ commands
RELEASE_FLAGS = {"--create-namespace", "--set", "--set-string", "-f", "--values", "--wait",
                 "--timeout", "--version", "--atomic", "--wait-for-jobs", "--skip-schema-validation",
                 "--take-ownership", "-o", "--output"}


async def cmd_install(pos: list[str], flags: dict) -> int:
    known(flags, RELEASE_FLAGS)
    if len(pos) != 2:
        raise UsageError("usage: helm install RELEASE CHART [flags]")
    release, chart = pos
    rel = await helm.Install(configuration(flags)).run(
        release, chart, values=collect_values(flags), version=flag(flags, "--version"),
        create_namespace=bool_flag(flags, "--create-namespace"),
        wait=bool_flag(flags, "--wait") or bool_flag(flags, "--atomic"),
        timeout=parse_duration(flag(flags, "--timeout", default="5m0s") or "5m0s"),
        skip_schema_validation=bool_flag(flags, "--skip-schema-validation"),
        wait_for_jobs=bool_flag(flags, "--wait-for-jobs"),
        rollback_on_failure=bool_flag(flags, "--atomic"),
        take_ownership=bool_flag(flags, "--take-ownership"),
    )
    print_release(rel, flags)
    return 0


async def cmd_upgrade(pos: list[str], flags: dict) -> int:
    known(flags, RELEASE_FLAGS | {"--install", "-i", "--reuse-values", "--reset-values",
                                  "--cleanup-on-fail", "--max-history"})
    if len(pos) != 2:
        raise UsageError("usage: helm upgrade [--install] RELEASE CHART [flags]")
    release, chart = pos
    rel = await helm.Upgrade(configuration(flags)).run(
        release, chart, values=collect_values(flags), version=flag(flags, "--version"),
        install=bool_flag(flags, "--install", "-i"),
        create_namespace=bool_flag(flags, "--create-namespace"),
        wait=bool_flag(flags, "--wait") or bool_flag(flags, "--atomic"),
        timeout=parse_duration(flag(flags, "--timeout", default="5m0s") or "5m0s"),
        wait_for_jobs=bool_flag(flags, "--wait-for-jobs"),
        max_history=int(flag(flags, "--max-history", default="10") or "10"),
        skip_schema_validation=bool_flag(flags, "--skip-schema-validation"),
        rollback_on_failure=bool_flag(flags, "--atomic"),
        take_ownership=bool_flag(flags, "--take-ownership"),
        cleanup_on_fail=bool_flag(flags, "--cleanup-on-fail"),
        reset_values=bool_flag(flags, "--reset-values"),
        reuse_values=bool_flag(flags, "--reuse-values"),
    )
    print_release(rel, flags)
    return 0


async def cmd_uninstall(pos: list[str], flags: dict) -> int:
    known(flags, {"--wait", "--timeout", "--ignore-not-found"})
    if not pos:
        raise UsageError("usage: helm uninstall RELEASE... [flags]")
    for release in pos:
        try:
            await helm.Uninstall(configuration(flags)).run(
                release, wait=bool_flag(flags, "--wait"),
                timeout=parse_duration(flag(flags, "--timeout", default="5m0s") or "5m0s"),
            )
        except helm.ReleaseNotFoundError:
            if not bool_flag(flags, "--ignore-not-found"):
                raise
        print(f'release "{release}" uninstalled')
    return 0


async def cmd_status(pos: list[str], flags: dict) -> int:
    known(flags, {"-o", "--output"})
    if len(pos) != 1:
        raise UsageError("usage: helm status RELEASE [flags]")
    print_release(await helm.Status(configuration(flags)).run(pos[0]), flags)
    return 0


async def cmd_list(pos: list[str], flags: dict) -> int:
    known(flags, {"-a", "--all", "-o", "--output", "-A", "--all-namespaces"})
    show_all = bool_flag(flags, "-a", "--all")
    if bool_flag(flags, "-A", "--all-namespaces"):
        # helm-sdkpy lists one namespace at a time: ask kubectl for the namespaces.
        cmd = ["kubectl", "get", "namespaces", "-o", "jsonpath={.items[*].metadata.name}"]
        if flag(flags, "--kubeconfig"):
            cmd[1:1] = ["--kubeconfig", flag(flags, "--kubeconfig")]
        names = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout.split()
        rels = []
        for ns in names:
            scoped = dict(flags)
            scoped["-n"] = [ns]
            rels.extend(await helm.List(configuration(scoped)).run(all=show_all) or [])
    else:
        rels = await helm.List(configuration(flags)).run(all=show_all) or []
    if flag(flags, "-o", "--output") == "json":
        print(json.dumps(rels, indent=2, default=str))
        return 0
    print(f"{'NAME':<24}{'NAMESPACE':<24}{'REVISION':<10}{'STATUS':<12}CHART")
    for r in rels or []:
        info = r.get("info") if isinstance(r.get("info"), dict) else {}
        chart = r.get("chart", "")
        if isinstance(chart, dict):
            meta = chart.get("metadata", chart)
            chart = f"{meta.get('name', '')}-{meta.get('version', '')}"
        print(f"{r.get('name', ''):<24}{r.get('namespace', ''):<24}"
              f"{r.get('version', r.get('revision', '')):<10}"
              f"{info.get('status', r.get('status', '')):<12}{chart}")
    return 0


async def cmd_get(pos: list[str], flags: dict) -> int:
    known(flags, {"-a", "--all", "-o", "--output"})
    if len(pos) != 2 or pos[0] != "values":
        raise UsageError("usage: helm get values RELEASE [-a] [-o json]")
    vals = await helm.GetValues(configuration(flags)).run(pos[1], all=bool_flag(flags, "-a", "--all"))
    if flag(flags, "-o", "--output") == "json" or yaml is None:
        print(json.dumps(vals, indent=2, default=str))
    else:
        print(yaml.safe_dump(vals, sort_keys=False), end="")
    return 0


async def cmd_history(pos: list[str], flags: dict) -> int:
    known(flags, {"-o", "--output"})
    if len(pos) != 1:
        raise UsageError("usage: helm history RELEASE")
    print(json.dumps(await helm.History(configuration(flags)).run(pos[0]), indent=2, default=str))
    return 0


async def cmd_rollback(pos: list[str], flags: dict) -> int:
    known(flags, {"--wait", "--timeout"})
    if len(pos) not in (1, 2):
        raise UsageError("usage: helm rollback RELEASE [REVISION]")
    await helm.Rollback(configuration(flags)).run(pos[0], int(pos[1]) if len(pos) == 2 else 0)
    print("Rollback was a success! Happy Helming!")
    return 0


async def cmd_test(pos: list[str], flags: dict) -> int:
    known(flags, {"--timeout", "--logs"})
    if len(pos) != 1:
        raise UsageError("usage: helm test RELEASE")
    print_release(await helm.ReleaseTest(configuration(flags)).run(pos[0]), flags)
    return 0


SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


async def cmd_lint(pos: list[str], flags: dict) -> int:
    known(flags, {"--strict"})
    charts = pos or ["."]
    failed = 0
    for chart in charts:
        result = await helm.Lint(configuration(flags)).run(chart)
        messages = result.get("Messages") or result.get("messages") or []
        errors = result.get("Errors") or result.get("errors") or []
        worst = max([int(m.get("Severity", 0)) for m in messages] or [0])
        limit = 2 if bool_flag(flags, "--strict") else 3
        print(f"==> Linting {chart}")
        for m in messages:
            err = m.get("Err")
            # helm-sdkpy 0.1.32 serialises the Go error as {}: only path + severity survive.
            text = err if isinstance(err, str) and err else "(details not exposed by helm-sdkpy)"
            print(f"[{SEVERITY.get(int(m.get('Severity', 0)), '?')}] {m.get('Path', '')}: {text}")
        if errors or worst >= limit:
            failed += 1
            print(f"Error: {chart} failed linting")
        print()
    print(f"{len(charts)} chart(s) linted, {failed} chart(s) failed")
    return 1 if failed else 0


async def cmd_version(pos: list[str], flags: dict) -> int:
    print(f"helm-sdkpy {helm.__version__} (Helm {helm.get_version()}), via tests/cluster/helm")
    return 0


async def cmd_template(pos: list[str], flags: dict) -> int:
    print("helm template: not supported by this wrapper (helm-sdkpy 0.1.32 has no template or "
          "dry-run action); install the real helm for it", file=sys.stderr)
    return 2


COMMANDS = {
    "install": cmd_install, "upgrade": cmd_upgrade, "uninstall": cmd_uninstall,
    "delete": cmd_uninstall, "un": cmd_uninstall, "status": cmd_status, "list": cmd_list,
    "ls": cmd_list, "get": cmd_get, "history": cmd_history, "rollback": cmd_rollback,
    "test": cmd_test, "lint": cmd_lint, "version": cmd_version, "template": cmd_template,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    try:
        pos, flags = parse(argv)
        if not pos or pos[0] not in COMMANDS:
            raise UsageError(f"unknown command {pos[0] if pos else ''!r}; see `helm --help`")
        return asyncio.run(COMMANDS[pos[0]](pos[1:], flags))
    except UsageError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    except helm.HelmError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
