#!/usr/bin/env python3
"""Lists the `crate::` edges between pulse's modules and fails on a cycle.

A module is a source file under src/ (`src/a/b.rs` and `src/a/b/mod.rs` are
`a::b`). An edge A -> B is any path in A's code (a `use` item, braces
expanded, or an inline `crate::…`, `super::…` or `self::…` path) that
resolves to B, taking the longest prefix of the path that names a module
file; a path that starts with a child module's name is relative to A. Comments and `#[cfg(test)]` modules are ignored: tests are consumers
of a module, and may build their input with any other (the generator, say).
Declaring a child (`mod x;`) is not an edge.

Usage: scripts/check_cycles.py [--edges | --self-test]
  --edges      print every edge
  --self-test  check the checker on small trees with known problems
Exit status 1 if the graph has a cycle, a pure module imports an I/O one
(source/, sink/, serve/, the wiring, the core stage or the evaluation
tools), or a leaf module (model, timefmt, sketch) imports any module.
"""

import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

# Modules that must not depend on I/O (source/, sink/, serve/, app, cli).
PURE = ["decode", "window", "detect", "factors::kernels", "factors::ids",
        "factors::ring", "factors::reservoir", "factors::bpr", "factors::mf",
        "factors::trending", "factors::model", "factors::quality", "model",
        "timefmt", "sketch"]
IO = ["source", "sink", "serve", "app", "aggregate", "eval"]
# Modules that import no other module of the crate.
LEAVES = ["model", "timefmt", "sketch"]


def module_files(root):
    mods = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            parts = rel[:-3].split(os.sep)
            if parts[-1] == "mod":
                parts = parts[:-1]
            if parts in (["lib"], ["main"]):
                parts = [] if parts == ["lib"] else ["main"]
            mods["::".join(parts)] = os.path.join(dirpath, f)
    return mods


def strip_comments(src):
    out, i, n = [], 0, len(src)
    while i < n:
        if src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif src[i] == '"':
            # skip string literals (raw strings are rare in use paths)
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif src.startswith("r#\"", i):
            j = src.find("\"#", i + 3)
            out.append('""')
            i = n if j < 0 else j + 2
        else:
            out.append(src[i])
            i += 1
    return "".join(out)


def strip_test_modules(src):
    """Removes `#[cfg(test)] mod name { ... }` blocks (comments already gone)."""
    src = re.sub(r"'(\\.|[^\\'])'", "' '", src)  # char literals such as '{'
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(pub\s+)?mod\s+\w+\s*\{", src)
        if not m:
            return src
        depth, i = 1, m.end()
        while i < len(src) and depth:
            depth += {"{": 1, "}": -1}.get(src[i], 0)
            i += 1
        src = src[:m.start()] + src[i:]


def expand_use(tree):
    """Expands `a::{b, c::{d, e}}` into ['a::b', 'a::c::d', 'a::c::e']."""
    tree = re.sub(r"\s+", "", tree)

    def parse(s, i):
        # returns (list of paths, index after)
        prefix = ""
        while i < len(s) and s[i] not in "{,}":
            prefix += s[i]
            i += 1
        if i < len(s) and s[i] == "{":
            i += 1
            paths = []
            while True:
                sub, i = parse(s, i)
                paths += [prefix + p for p in sub]
                if i < len(s) and s[i] == ",":
                    i += 1
                    continue
                if i < len(s) and s[i] == "}":
                    i += 1
                break
            return paths, i
        return [prefix], i

    paths, _ = parse(tree, 0)
    return [re.sub(r"\bas\w+$", "", p) for p in paths if p]


def inline_modules(src):
    """(start, end, name) of each inline `mod name { ... }` block."""
    spans = []
    for m in re.finditer(r"\bmod\s+(\w+)\s*\{", src):
        depth, i = 1, m.end()
        while i < len(src) and depth:
            depth += {"{": 1, "}": -1}.get(src[i], 0)
            i += 1
        spans.append((m.start(), i, m.group(1)))
    return spans


def scope_at(name, spans, pos):
    """The module path at `pos`: the file's module plus enclosing inline ones."""
    inner = [n for (a, b, n) in spans if a < pos < b]
    return "::".join(([name] if name else []) + inner)


def resolve(path, here, mods):
    segs = [s for s in path.split("::") if s]
    if not segs:
        return None
    if segs[0] == "crate":
        base, segs = [], segs[1:]
    elif segs[0] in ("super", "self"):
        base = here.split("::") if here else []
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                base = base[:-1]
            segs = segs[1:]
    else:
        return None
    full = base + segs
    for k in range(len(full), -1, -1):
        name = "::".join(full[:k])
        if name in mods:
            return name
    return None


def edges_of(name, path, mods):
    src = strip_test_modules(strip_comments(open(path, encoding="utf-8").read()))
    spans = inline_modules(src)
    found = set()
    for m in re.finditer(r"\buse\s+([^;]+);", src):
        here = scope_at(name, spans, m.start())
        for p in expand_use(m.group(1)):
            head = p.split("::")[0]
            child = f"{name}::{head}" if name else head
            if head not in ("crate", "super", "self") and child in mods:
                p = "self::" + p
            t = resolve(p, here, mods)
            if t is not None and t != name:
                found.add(t)
    for m in re.finditer(r"\b((?:crate|super|self)(?:::\w+)+)", src):
        t = resolve(m.group(1), scope_at(name, spans, m.start()), mods)
        if t is not None and t != name:
            found.add(t)
    # paths relative to this module: `child::item` (in `use` or inline)
    for m in re.finditer(r"(?<![:\w])([a-z_]\w*)((?:::\w+)+)", src):
        child = f"{name}::{m.group(1)}" if name else m.group(1)
        if child in mods:
            t = resolve("self::" + m.group(1) + m.group(2), name, mods)
            if t is not None and t != name:
                found.add(t)
    # a child module file's parent only declares it: `pub mod x;` is no edge
    return found


def find_cycles(graph):
    index, low, stack, on, sccs = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sccs


def under(mod, prefixes):
    return any(mod == p or mod.startswith(p + "::") for p in prefixes)


def binary_modules(root, mods):
    """Modules of the `pulse` binary: those main.rs declares (`mod x;`)."""
    path = os.path.join(root, "main.rs")
    if not os.path.exists(path):
        return set()
    main = strip_comments(open(path, encoding="utf-8").read())
    return {m for m in re.findall(r"^\s*mod\s+(\w+)\s*;", main, flags=re.M) if m in mods}


def check(root, show_edges=False, out=print):
    """Prints the problems of the tree at `root`; returns how many."""
    mods = module_files(root)
    for b in binary_modules(root, mods):
        del mods[b]  # the binary uses the library as `pulse::`, not `crate::`
    graph = {}
    for name, path in sorted(mods.items()):
        if name in ("", "main"):
            continue  # the crate root and the binary only wire modules
        graph[name] = edges_of(name, path, mods) - {""}
    if show_edges:
        for a in sorted(graph):
            for b in sorted(graph[a]):
                out(f"{a or 'crate'} -> {b}")
    bad = 0
    for comp in find_cycles(graph):
        bad += 1
        out("cycle: " + " <-> ".join(comp))
    for a in sorted(graph):
        if not under(a, PURE) or under(a, IO):
            continue
        for b in sorted(graph[a]):
            if under(b, IO):
                bad += 1
                out(f"pure module imports I/O: {a} -> {b}")
    for a in LEAVES:
        for b in sorted(graph.get(a, ())):
            bad += 1
            out(f"leaf module imports another: {a} -> {b}")
    n_edges = sum(len(v) for v in graph.values())
    status = "FAIL" if bad else "ok"
    out(f"check_cycles: {len(graph)} modules, {n_edges} edges, {bad} problems: {status}")
    return bad

def self_test():
    """Runs the checker on small trees whose problems are known."""
    import tempfile

    def tree(files):
        d = tempfile.mkdtemp(prefix="check-cycles-")
        for name, text in files.items():
            path = os.path.join(d, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return d

    def problems(files):
        lines = []
        bad = check(tree(files), out=lines.append)
        return bad, lines

    cases = [
        # (files, expected problem count, a line that must appear)
        ({"lib.rs": "mod a; mod b;", "a.rs": "use crate::b::X;", "b.rs": "use crate::a::Y;"},
         1, "cycle: a <-> b"),
        ({"lib.rs": "", "a.rs": "use crate::b::{c::X, Y};", "b/mod.rs": "pub mod c;",
          "b/c.rs": "fn f() { crate::a::g() }"}, 1, "cycle: a <-> b::c"),
        # a child named without a prefix, and `super` inside an inline module
        ({"lib.rs": "", "p/mod.rs": "mod q; fn f() { q::g() }",
          "p/q.rs": "mod inner { use super::super::h; }"}, 1, "cycle: p <-> p::q"),
        ({"lib.rs": "", "decode.rs": "use crate::sink::W;", "sink.rs": ""},
         1, "pure module imports I/O: decode -> sink"),
        ({"lib.rs": "", "model.rs": "use crate::config::C;", "config.rs": ""},
         1, "leaf module imports another: model -> config"),
        # tests and comments are not edges; `mod x;` is not an edge
        ({"lib.rs": "", "a.rs": "// use crate::b::X;\n#[cfg(test)]\nmod tests { use crate::b::X; }",
          "b.rs": "use crate::a::Y;"}, 0, "0 problems: ok"),
    ]
    failed = 0
    for files, want, line in cases:
        bad, lines = problems(files)
        if bad != want or not any(line in x for x in lines):
            failed += 1
            print(f"self-test failed: expected {want} problem(s) and {line!r}, got {lines}")
    print(f"check_cycles self-test: {len(cases) - failed} passed, {failed} failed")
    return 1 if failed else 0


def main():
    if "--self-test" in sys.argv:
        return self_test()
    return 1 if check(ROOT, "--edges" in sys.argv) else 0


if __name__ == "__main__":
    sys.exit(main())
