"""launch/search_agent_cpu.sh: valid bash that waits for the retriever's health endpoint
and stops the server on exit."""
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "search_agent_cpu.sh"


def test_search_agent_launcher_parses_and_manages_the_server():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    text = SCRIPT.read_text()
    assert "/health" in text and "trap " in text and "serve-retriever" in text
    assert text.index("cli serve-retriever") < text.index("$PORT/health") < text.index("cli train")
