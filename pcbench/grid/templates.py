"""The template language of grid specs: `${expr}` in any string value.

An expression is a small, safe subset of Python: numbers, strings, lists and dicts; arithmetic
(`+ - * / // % **`), one comparison, `and`/`or`/`not`, `a if c else b`, `x.attr`, `x[i]`, and calls
of `int float round min max str abs`. Names are looked up in a context (the run's labels, `params`,
`parent`, `tokens`); a callable value is called on use, so `params` is counted only when asked for.
A string that is exactly one template keeps the expression's type (`"${ratio * params}"` is an int);
otherwise each result is formatted into the string. Errors name the field and the known names.
"""

from __future__ import annotations

import ast
import functools
import operator
from typing import Any

from pcbench.spec.config import SpecError
from pcbench.util.suggest import did_you_mean

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b}
_FUNCS = {"int": int, "float": float, "round": round, "min": min, "max": max, "str": str, "abs": abs}


class _Unknown(Exception):
    def __init__(self, name: str):
        self.name = name


def _eval(node: ast.AST, ctx: dict) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body, ctx)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in _FUNCS:
            return _FUNCS[node.id]
        if node.id not in ctx:
            raise _Unknown(node.id)
        v = ctx[node.id]
        return v() if callable(v) and not isinstance(v, type) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval(node.left, ctx), _eval(node.right, ctx))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        v = _eval(node.operand, ctx)
        return -v if isinstance(node.op, ast.USub) else (not v if isinstance(node.op, ast.Not) else v)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
        return _CMPOPS[type(node.ops[0])](_eval(node.left, ctx), _eval(node.comparators[0], ctx))
    if isinstance(node, ast.BoolOp):
        vals = [_eval(v, ctx) for v in node.values]
        return all(vals) if isinstance(node.op, ast.And) else any(vals)
    if isinstance(node, ast.IfExp):
        return _eval(node.body, ctx) if _eval(node.test, ctx) else _eval(node.orelse, ctx)
    if isinstance(node, ast.Attribute):
        base = _eval(node.value, ctx)
        if isinstance(base, dict):
            if node.attr not in base:
                raise _Unknown(node.attr)
            return base[node.attr]
        if not hasattr(base, node.attr):
            raise _Unknown(node.attr)
        return getattr(base, node.attr)
    if isinstance(node, ast.Subscript):
        return _eval(node.value, ctx)[_eval(node.slice, ctx)]
    if isinstance(node, (ast.Dict,)):
        return {_eval(k, ctx): _eval(v, ctx) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval(e, ctx) for e in node.elts]
    if isinstance(node, ast.Call) and not node.keywords:
        fn = _eval(node.func, ctx)
        if fn not in _FUNCS.values():
            raise ValueError("only int, float, round, min, max, str and abs may be called")
        return fn(*[_eval(a, ctx) for a in node.args])
    raise ValueError(f"unsupported expression element {type(node).__name__}")


@functools.lru_cache(maxsize=4096)
def _parse(expr: str) -> ast.Expression:
    """The parsed expression (once per text: a grid evaluates the same few thousands of times; the
    tree is only read)."""
    return ast.parse(expr.strip(), mode="eval")


def evaluate(expr: str, ctx: dict, path: str) -> Any:
    """Evaluate one `${...}` expression; errors name the field path and the known names."""
    try:
        return _eval(_parse(expr), ctx)
    except _Unknown as e:
        names = sorted(k for k in ctx if not k.startswith("_"))
        raise SpecError(path, f"unknown name {e.name!r} in ${{{expr}}}{did_you_mean(e.name, names)}; "
                        f"known: {', '.join(names)}") from None
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001 - any evaluation error is a spec error
        raise SpecError(path, f"cannot evaluate ${{{expr}}}: {e}") from None


def _spans(text: str, path: str = "") -> list[tuple[int, int, str]]:
    """(start, end, expression) of every `${...}` in `text`, braces balanced inside."""
    out, i = [], 0
    while True:
        start = text.find("${", i)
        if start < 0:
            return out
        depth, j = 0, start + 1
        while j < len(text):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if j >= len(text):
            raise SpecError(path or "template", f"unclosed ${{ in {text!r}")
        out.append((start, j + 1, text[start + 2:j]))
        i = j + 1


def substitute(value: Any, ctx: dict, path: str) -> Any:
    """Fill `${...}` templates in a nested structure. A string that is exactly one template keeps
    the expression's type; otherwise the results are formatted into the string."""
    if isinstance(value, dict):
        return {k: substitute(v, ctx, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, ctx, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        spans = _spans(value, path)
        if len(spans) == 1 and spans[0][0] == 0 and spans[0][1] == len(value):
            return evaluate(spans[0][2], ctx, path)
        out, last = [], 0
        for a, b, expr in spans:
            out += [value[last:a], str(evaluate(expr, ctx, path))]
            last = b
        return "".join(out + [value[last:]])
    return value


def template_names(value: Any) -> set[str]:
    """Every name the `${...}` templates in a nested structure mention."""
    names: set[str] = set()
    if isinstance(value, dict):
        for v in value.values():
            names |= template_names(v)
    elif isinstance(value, list):
        for v in value:
            names |= template_names(v)
    elif isinstance(value, str) and "${" in value:
        for _, _, expr in _spans(value):
            try:
                names |= {n.id for n in ast.walk(ast.parse(expr.strip(), mode="eval")) if isinstance(n, ast.Name)}
            except SyntaxError:
                pass
    return names
