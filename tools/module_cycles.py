#!/usr/bin/env python3
"""Module cycles in the workspace's Rust crates.

Reads every crates/*/src (and bin/*/src) tree, builds the graph "module A uses module B" from
`use crate::…`, `crate::…`, `super::…` and `self::…` paths (comments and string literals
skipped), prints every cycle (a strongly connected component of more than one module) and exits
1 if there is one, else prints "no module cycles" and exits 0.

A module is a file: `foo.rs` and `foo/mod.rs` are `foo`, `lib.rs` / `main.rs` the crate root.
Inline modules (`mod tests { … }`) belong to their file. A path through a module's `pub use`
re-export is followed to the module that defines the item (so a child that names
`super::Item`, where the parent only re-exports `Item` from a sibling, depends on the sibling,
not on the parent); the re-export itself is an edge from the re-exporting module. A `mod`
declaration is not an edge: declaring a child is not using it.

Usage: python3 tools/module_cycles.py [repo-root]
"""

import os
import re
import sys

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_comments_and_strings(text):
    """The source with comments, string and char literals blanked (newlines kept)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not re.match(r"\w", text[i - 1])):
            m = re.match(r'r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            end = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'":
            # A char literal ('a', '\n', '\u{..}'), not a lifetime ('a).
            m = re.match(r"'(\\.[^']*|[^'\\])'", text[i:])
            if m:
                out.append("' '")
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_files(src):
    """{module path tuple: file} for one crate's src folder."""
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            full = os.path.join(root, f)
            rel = os.path.relpath(full, src)[:-3].split(os.sep)
            if rel[-1] in ("mod",) or (len(rel) == 1 and rel[0] in ("lib", "main")):
                rel = rel[:-1]
            mods[tuple(rel)] = full
    return mods


def parse_use_tree(s, i, prefix, out):
    """Parses a use tree starting at s[i] (after `use`), appending full paths to out.
    Returns the index after the tree."""
    path = list(prefix)
    while True:
        while i < len(s) and s[i].isspace():
            i += 1
        if s.startswith("{", i):
            i += 1
            while True:
                while i < len(s) and (s[i].isspace() or s[i] == ","):
                    i += 1
                if i >= len(s) or s[i] == "}":
                    return i + 1
                i = parse_use_tree(s, i, path, out)
        m = re.compile(r"(" + IDENT + r"|\*)\s*").match(s, i)
        if not m:
            out.append(path)
            return i
        path = path + [m.group(1)]
        i = m.end()
        if s.startswith("::", i):
            i += 2
            continue
        m2 = re.compile(r"as\s+(" + IDENT + r")\s*").match(s, i)
        alias = None
        if m2:
            alias = m2.group(1)
            i = m2.end()
        out.append(path + ([("as", alias)] if alias else []))
        return i


class Crate:
    def __init__(self, name, src):
        self.name = name
        self.mods = module_files(src)
        self.text = {}
        for m, f in self.mods.items():
            with open(f, encoding="utf-8") as fh:
                self.text[m] = strip_comments_and_strings(fh.read())
        self.reexports = {m: self._reexports(m) for m in self.mods}

    def children(self, m):
        return {k[-1] for k in self.mods if len(k) == len(m) + 1 and k[: len(m)] == m}

    def use_statements(self, m):
        """(is_pub, [path segments]) of every `use` in module m, with inline-module depth."""
        s = self.text[m]
        out = []
        for mm in re.finditer(r"(?:^|[;{}\s])(pub(?:\([^)]*\))?\s+)?use\s+", s):
            paths = []
            parse_use_tree(s, mm.end(), [], paths)
            depth = self.inline_depth(m, mm.start())
            for p in paths:
                out.append((bool(mm.group(1)), p, depth))
        return out

    def inline_depth(self, m, pos):
        """How many inline `mod x { … }` blocks of module m enclose position pos."""
        s = self.text[m]
        depth = 0
        stack = []
        braces = 0
        opener = re.compile(r"\bmod\s+" + IDENT + r"\s*\{")
        i = 0
        for mm in opener.finditer(s, 0, pos):
            pass
        # Walk braces up to pos, noting which ones open inline modules.
        marks = {mm.end() - 1 for mm in opener.finditer(s, 0, pos)}
        for i in range(pos):
            ch = s[i]
            if ch == "{":
                stack.append(i in marks)
                braces += 1
            elif ch == "}" and stack:
                stack.pop()
        depth = sum(stack)
        return depth

    def _reexports(self, m):
        """{exported name: absolute path of what it re-exports} of module m (`pub use`)."""
        out = {}
        for is_pub, p, depth in self.use_statements(m) if m in self.mods else []:
            if not is_pub or depth:
                continue
            alias = p[-1][1] if p and isinstance(p[-1], tuple) else None
            segs = [x for x in p if not isinstance(x, tuple)]
            absolute = self.absolute(m, segs, 0)
            if absolute is None:
                continue
            name = alias or segs[-1]
            out[name] = absolute
        return out

    def absolute(self, m, segs, depth):
        """The absolute segment list of a path written in module m, or None (external)."""
        if not segs:
            return None
        head = segs[0]
        base = list(m)
        if head == "crate":
            return segs[1:]
        if head in ("self", "super"):
            rest = segs
            # Inside inline modules `super` first climbs out of them, staying in the file.
            while rest and rest[0] == "super":
                if depth:
                    depth -= 1
                else:
                    base = base[:-1]
                rest = rest[1:]
            if rest and rest[0] == "self":
                rest = rest[1:]
            return base + rest
        if head in self.children(m):
            return base + segs
        return None

    def resolve(self, segs, seen=None):
        """The module an absolute path's item lives in (following re-exports)."""
        seen = seen or set()
        cur = ()
        for i, seg in enumerate(segs):
            if seg == "*":
                return cur
            child = cur + (seg,)
            if child in self.mods:
                cur = child
                continue
            target = self.reexports.get(cur, {}).get(seg)
            key = (cur, seg)
            if target is not None and key not in seen:
                seen.add(key)
                return self.resolve(target + segs[i + 1:], seen)
            return cur
        return cur

    def edges(self):
        edges = {m: set() for m in self.mods}
        for m in self.mods:
            s = self.text[m]
            targets = []
            for _, p, depth in self.use_statements(m):
                segs = [x for x in p if not isinstance(x, tuple)]
                a = self.absolute(m, segs, depth)
                if a is not None:
                    targets.append(a)
            # Paths in expressions and types: crate::a::b, super::a, self::a.
            for mm in re.finditer(r"(?<![\w:])((?:crate|super|self)(?:\s*::\s*" + IDENT + r")+)", s):
                # The head of a `use a::{…}` / `use a::*` tree: the use pass above resolves its leaves.
                if re.match(r"\s*::\s*[{*]", s[mm.end():]):
                    continue
                segs = [x.strip() for x in mm.group(1).split("::")]
                a = self.absolute(m, segs, self.inline_depth(m, mm.start()))
                if a is not None:
                    targets.append(a)
            for a in targets:
                t = self.resolve(a)
                if t != m and t in self.mods:
                    edges[m].add(t)
        return edges

    def label(self, m):
        return self.name + "::" + ("/".join(m) if m else "(root)")


def sccs(graph):
    """Tarjan's strongly connected components."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
    found = False
    for group in ("crates", "bin"):
        base = os.path.join(root, group)
        if not os.path.isdir(base):
            continue
        for name in sorted(os.listdir(base)):
            src = os.path.join(base, name, "src")
            if not os.path.isdir(src):
                continue
            crate = Crate(name, src)
            graph = crate.edges()
            for comp in sccs(graph):
                if len(comp) < 2:
                    continue
                found = True
                members = set(comp)
                print("cycle: " + ", ".join(sorted(crate.label(m) for m in comp)))
                for m in sorted(comp):
                    for t in sorted(graph[m] & members):
                        print("    {} -> {}".format(crate.label(m), crate.label(t)))
    if found:
        return 1
    print("no module cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
