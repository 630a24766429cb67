"""The `python` tool's sandbox: model-written code cannot reach a local server nor write
outside its temporary directory; without a sandbox the tool refuses unless allowed."""
import socket
import threading

import pytest

from megatron_rl.agent.config import AgentConfig
from megatron_rl.agent.tools import python_exec
from megatron_rl.agent.tools.python_exec import PythonExec
from megatron_rl.agent.tools.sandbox import sandbox_kind

needs_sandbox = pytest.mark.skipif(sandbox_kind() is None, reason="no bwrap / unprivileged unshare here")


@needs_sandbox
def test_sandboxed_code_cannot_connect_to_a_local_server():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        threading.Thread(target=lambda: srv.accept(), daemon=True).start()
        reachable = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')"
        code = f"try:\n    {reachable}\nexcept OSError as e:\n    print('blocked', e.errno)"
        (out,) = PythonExec(AgentConfig()).batch_call([code])
        assert out.startswith("blocked"), out
        with socket.create_connection(("127.0.0.1", port), timeout=2):   # the server itself is up
            pass


@needs_sandbox
def test_sandboxed_code_writes_only_its_own_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    code = (f"open('mine.txt', 'w').write('ok'); print(open('mine.txt').read())\n"
            f"try:\n    open({str(target)!r}, 'w').write('x'); print('wrote outside')\n"
            f"except OSError as e:\n    print('refused', e.strerror)")
    (out,) = PythonExec(AgentConfig()).batch_call([code])
    assert out.splitlines() == ["ok", "refused Read-only file system"], out
    assert not target.exists()


def test_without_a_sandbox_the_tool_refuses_unless_allowed(monkeypatch, capsys):
    monkeypatch.setattr(python_exec, "sandbox_kind", lambda: None)
    with pytest.raises(RuntimeError, match="agent.allow_unsandboxed_python"):
        PythonExec(AgentConfig())
    tool = PythonExec(AgentConfig(allow_unsandboxed_python=True))
    assert "UNSANDBOXED" in capsys.readouterr().out
    assert tool.batch_call(["print(6 * 7)"]) == ["42\n"]
