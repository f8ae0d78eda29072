"""Tools: function calling in the chat template's format, as an environment.

A tool is a Python callable with type hints and a docstring (Google style: a summary line,
then ``Args:``); transformers turns it into the JSON schema the chat template renders
(``apply_chat_template(tools=[fn, ...])``), so the model sees the tools the way its template
presents them. The model calls one in the common JSON-in-tags form::

    <tool_call>{"name": "calc", "arguments": {"expression": "347*29"}}</tool_call>

:class:`ToolEnv` runs every call of a turn and answers with one ``tool`` message per call
(the result as text, or ``error: ...`` when the call is malformed, names no tool, or raises:
errors go back to the model, they never stop the run). A turn without a tool call is the
model's final answer: :meth:`ToolEnv.grade` scores it and the episode ends. A tool-use
environment is just an environment, so the same loop trains it.

Built-ins: :func:`python_tool` (runs code in trustrl's sandbox, :func:`trustrl.rewards.code.run_in_sandbox`)
and :class:`CalculatorTask` (arithmetic with a ``calc`` tool).
"""

from __future__ import annotations

import ast
import json
import operator
import re
from typing import Any, Callable

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> list[dict[str, Any] | str]:
    """The tool calls in a turn's text, in order: ``{"name", "arguments"}`` dicts, or an error
    message (str) for a call whose JSON is malformed or lacks a name."""
    calls: list[dict[str, Any] | str] = []
    for body in TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as err:
            calls.append(f"error: the tool call is not JSON ({err.msg} at {err.pos})")
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append('error: a tool call must be {"name": ..., "arguments": {...}}')
            continue
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some templates write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                calls.append("error: arguments is not a JSON object")
                continue
        if not isinstance(arguments, dict):
            calls.append("error: arguments must be a JSON object")
            continue
        calls.append({"name": call["name"], "arguments": arguments})
    return calls


def run_tool_call(tools: dict[str, Callable], call: dict[str, Any] | str) -> dict[str, Any]:
    """One ``tool`` message: the call's result as text, or ``error: ...``."""
    if isinstance(call, str):
        return {"role": "tool", "name": "error", "content": call}
    name = call["name"]
    if name not in tools:
        return {"role": "tool", "name": name, "content": f"error: no tool named {name!r}; tools: {sorted(tools)}"}
    try:
        result = tools[name](**call["arguments"])
    except Exception as err:  # noqa: BLE001 - the model gets the error, the run goes on
        return {"role": "tool", "name": name, "content": f"error: {type(err).__name__}: {err}"}
    return {"role": "tool", "name": name, "content": result if isinstance(result, str) else json.dumps(result)}


class ToolEnv:
    """Base of tool-use environments: set ``tools`` (callables), implement :meth:`task` (the
    first observation from the row) and :meth:`grade` (the final answer's reward and success).
    ``max_tool_calls`` per episode; past it, calls get an error message."""

    tools: list[Callable] = []
    max_tool_calls: int = 8

    def task(self, row: dict[str, Any]) -> str:  # pragma: no cover - every task defines it
        raise NotImplementedError

    def grade(self, answer: str, row: dict[str, Any]) -> tuple[float, bool]:  # pragma: no cover
        raise NotImplementedError

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        self.row, self.calls = dict(options or {}), 0
        self._by_name = {fn.__name__: fn for fn in self.tools}
        return self.task(self.row), {}

    def step(self, action: str):
        calls = parse_tool_calls(action)
        if not calls:  # no tool call: the final answer
            reward, success = self.grade(action, self.row)
            return None, float(reward), True, False, {"success": bool(success)}
        messages = []
        for call in calls:
            self.calls += 1
            if self.calls > self.max_tool_calls:
                messages.append({"role": "tool", "name": "error",
                                 "content": f"error: more than {self.max_tool_calls} tool calls"})
            else:
                messages.append(run_tool_call(self._by_name, call))
        return messages, 0.0, False, False, {"tool_calls": len(calls)}


# -- built-in tools and the calculator task ----------------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arith(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.operand))
    raise ValueError("only integers and + - * // % are allowed")


def calc(expression: str) -> str:
    """Evaluate an integer arithmetic expression.

    Args:
        expression: integers with + - * // % and parentheses, e.g. "347*29".
    """
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    return str(_arith(ast.parse(expression, mode="eval").body))


def python_tool(code: str) -> str:
    """Run Python code in a sandbox and return what it printed.

    Args:
        code: a Python program; print the values you need.
    """
    from trustrl.rewards.code import run_in_sandbox

    result = run_in_sandbox(code, wall_time_s=5.0, cpu_time_s=5.0, memory_mb=256)
    if result.killed_reason is not None:
        return f"error: killed ({result.killed_reason})\n{result.stderr[-500:]}"
    if result.returncode != 0:
        return f"error: exit code {result.returncode}\n{result.stderr[-500:]}"
    return result.stdout[-2000:]


python_tool.__name__ = "python"


class CalculatorTask(ToolEnv):
    """``env: trustrl.envs.tools:CalculatorTask``; rows ``{"question": "347*29", "answer": 10063}``.
    The model may call ``calc``; its final answer (a turn without a tool call) earns 1 when it
    is the number asked for."""

    tools = [calc]

    def task(self, row: dict[str, Any]) -> str:
        return f"{row['question']}="

    def grade(self, answer: str, row: dict[str, Any]) -> tuple[float, bool]:
        right = answer.strip() == str(row["answer"])
        return float(right), right
