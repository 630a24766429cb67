"""`calculator`: arithmetic on numbers by walking the `ast` (no eval, no names)."""
from __future__ import annotations

import ast
import math
import operator

from megatron_rl.agent.tools.registry import ToolFailure, register_tool

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPONENT = 1000       # 9**9**9 would hang the rollout
_MAX_ABS = 1e300


def evaluate(expression: str) -> float | int:
    """Value of an arithmetic expression; ValueError names the offending construct."""
    tree = ast.parse(expression.strip(), mode="eval")
    return _eval(tree.body)


def _eval(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right} exceeds {_MAX_EXPONENT}")
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, complex) or abs(value) > _MAX_ABS:
            raise ValueError("result is not a finite real number")
        return value
    raise ValueError(f"unsupported expression element '{type(node).__name__}'")


def format_number(value) -> str:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


@register_tool("calculator")
class Calculator:
    def __init__(self, config=None):
        pass

    def batch_call(self, queries: list[str]) -> list[str]:
        out = []
        for q in queries:
            try:
                out.append(format_number(evaluate(q)))
            except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError) as e:
                out.append(ToolFailure(f"calculator error: {type(e).__name__}: {e}"))
        return out
