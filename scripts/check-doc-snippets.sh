#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Keeps the C++ code in README.md and docs/**/*.md identical to the compiled files under
# docs/snippets/ (docs/testing.md, "Snippets"). In the markdown, a block
#
#   <!-- snippet: docs/snippets/<file>#<name> -->
#   ```cpp
#   ...
#   ```
#   <!-- /snippet -->
#
# must hold exactly the lines of <file> between `// [snippet:<name>]` and `// [/snippet:<name>]`,
# less their common indentation and less any other snippet's marker lines. The check fails when a
# block differs, names a missing file or marker, is not closed, or when a ```cpp block stands
# outside any such markers (every C++ block of the docs must be compiled).
#
# Usage: scripts/check-doc-snippets.sh [--fix]
#   --fix  rewrites every marked block from its file (missing files or markers still fail).
# Exit: 0 in sync, 1 not (each place printed as file:line), 2 bad usage, 77 no python3.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v python3 >/dev/null 2>&1; then
  echo "check-doc-snippets: python3 not found; the check needs it (standard library only)" >&2
  exit 77
fi

exec python3 - "$@" <<'PYTHON'
import pathlib
import re
import sys

OPEN = re.compile(r"^\s*<!--\s*snippet:\s*(?P<path>[^#\s]+)#(?P<name>[\w.-]+)\s*-->\s*$")
CLOSE = re.compile(r"^\s*<!--\s*/snippet\s*-->\s*$")
BEGIN = re.compile(r"^\s*//\s*\[snippet:(?P<name>[\w.-]+)\]\s*$")
END = re.compile(r"^\s*//\s*\[/snippet:(?P<name>[\w.-]+)\]\s*$")
ANY_MARKER = re.compile(r"^\s*//\s*\[/?snippet:[\w.-]+\]\s*$")
FENCE = re.compile(r"^\s*```")
CPP_FENCE = re.compile(r"^\s*```(cpp|c\+\+|cxx|cuda)\s*$")


def excerpt(root, rel, name):
    """The excerpt `name` of file `rel`, as a list of lines, or an error message."""
    path = root / rel
    if not path.is_file():
        return None, f"names {rel}, which does not exist"
    lines = path.read_text(encoding="utf-8").splitlines()
    start = end = None
    for i, line in enumerate(lines):
        m = BEGIN.match(line)
        if m and m.group("name") == name:
            if start is not None:
                return None, f"{rel} has two '// [snippet:{name}]' markers"
            start = i
        m = END.match(line)
        if m and m.group("name") == name and start is not None and end is None:
            end = i
    if start is None:
        return None, f"names marker '{name}', which {rel} does not have ('// [snippet:{name}]')"
    if end is None:
        return None, f"{rel} opens '{name}' at line {start + 1} but never closes it"
    body = [l for l in lines[start + 1:end] if not ANY_MARKER.match(l)]
    indents = [len(l) - len(l.lstrip(" ")) for l in body if l.strip()]
    cut = min(indents) if indents else 0
    return [l[cut:] if l.strip() else "" for l in body], None


def check(root, md, fix):
    """Returns (errors, new text or None)."""
    rel_md = md.relative_to(root)
    lines = md.read_text(encoding="utf-8").splitlines(keepends=True)
    errors, out, i, changed = [], [], 0, False
    in_fence = False
    while i < len(lines):
        line = lines[i]
        m = OPEN.match(line)
        if m and not in_fence:
            out.append(line)
            close = None
            for j in range(i + 1, len(lines)):
                if CLOSE.match(lines[j]):
                    close = j
                    break
                if OPEN.match(lines[j]):
                    break
            if close is None:
                errors.append(f"{rel_md}:{i + 1}: '<!-- snippet: ... -->' without '<!-- /snippet -->'")
                i += 1
                continue
            block = lines[i + 1:close]
            want, error = excerpt(root, m.group("path"), m.group("name"))
            if error:
                errors.append(f"{rel_md}:{i + 1}: {error}")
                out.extend(block)
            else:
                fenced = ["```cpp\n"] + [l + "\n" for l in want] + ["```\n"]
                if block != fenced:
                    if fix:
                        changed = True
                    else:
                        have = [l.rstrip("\n") for l in block]
                        at = next((k for k, (a, b) in enumerate(zip(have, [l.rstrip("\n") for l in fenced])) if a != b),
                                  min(len(have), len(fenced)))
                        errors.append(
                            f"{rel_md}:{i + 2 + at}: differs from {m.group('path')}#{m.group('name')} "
                            f"(scripts/check-doc-snippets.sh --fix rewrites it)")
                    out.extend(fenced if fix else block)
                else:
                    out.extend(block)
            out.append(lines[close])
            i = close + 1
            continue
        if CLOSE.match(line) and not in_fence:
            errors.append(f"{rel_md}:{i + 1}: '<!-- /snippet -->' without an opening marker")
        if FENCE.match(line):
            if not in_fence and CPP_FENCE.match(line):
                errors.append(f"{rel_md}:{i + 1}: a C++ block outside snippet markers; put the code "
                              f"in docs/snippets/ and mark the block")
            in_fence = not in_fence
        out.append(line)
        i += 1
    return errors, ("".join(out) if changed else None)


def main(argv):
    fix = False
    for arg in argv:
        if arg == "--fix":
            fix = True
        else:
            print(f"check-doc-snippets: unknown argument '{arg}'; expected --fix or nothing",
                  file=sys.stderr)
            return 2
    root = pathlib.Path.cwd()
    files = [root / "README.md"] + sorted((root / "docs").rglob("*.md"))
    errors, blocks, fixed = [], 0, []
    for md in files:
        if not md.is_file():
            continue
        blocks += sum(1 for l in md.read_text(encoding="utf-8").splitlines() if OPEN.match(l))
        file_errors, text = check(root, md, fix)
        errors += file_errors
        if text is not None:
            md.write_text(text, encoding="utf-8")
            fixed.append(str(md.relative_to(root)))
    for e in errors:
        print(e, file=sys.stderr)
    if fixed:
        print("check-doc-snippets: rewrote " + ", ".join(fixed))
    if errors:
        print(f"check-doc-snippets: {len(errors)} problem(s) in {len(files)} markdown files",
              file=sys.stderr)
        return 1
    print(f"check-doc-snippets: {blocks} snippet blocks in {len(files)} markdown files match "
          f"docs/snippets/")
    return 0


sys.exit(main(sys.argv[1:]))
PYTHON
