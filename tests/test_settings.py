"""Settings from PYDLIT_* variables: defaults, overrides, and values refused before they can hang
or crash the service."""
from __future__ import annotations

import pytest

from pydlit.cli import parse_args
from pydlit.settings import Settings, from_env

MiB = 1024 * 1024


def test_defaults() -> None:
    s = from_env({})
    assert s == Settings(node=s.node)
    assert s.port == 5001 and s.db == "./pydlit.db" and s.concurrency == 16
    assert s.tuning.parallel_blobs == 4 and s.tuning.max_streams == 8
    assert s.tuning.chunk_size == 16 * MiB and s.tuning.buffer_size == 8 * MiB
    assert s.tuning.detach_after_s == 2.0


def test_variables_override_the_defaults() -> None:
    s = from_env({
        "PYDLIT_PORT": "6000", "PYDLIT_CONCURRENCY": "2", "PYDLIT_PARALLEL_BLOBS": "3", "PYDLIT_MAX_STREAMS": "5",
        "PYDLIT_CHUNK_MIB": "1", "PYDLIT_BUFFER_MIB": "0.5", "PYDLIT_LOG_FORMAT": "JSON", "PYDLIT_NODE": "n1",
        "PYDLIT_DETACH_AFTER_S": "0",
    })
    assert (s.port, s.concurrency, s.node, s.log_format) == (6000, 2, "n1", "json")
    assert (s.tuning.parallel_blobs, s.tuning.max_streams) == (3, 5)
    assert (s.tuning.chunk_size, s.tuning.buffer_size) == (MiB, MiB // 2)
    assert s.tuning.detach_after_s == 0


@pytest.mark.parametrize("name", ["PYDLIT_PARALLEL_BLOBS", "PYDLIT_MAX_STREAMS"])
@pytest.mark.parametrize("value", ["0", "-1", "1.5"])
def test_a_limit_that_would_stop_every_copy_is_refused(name: str, value: str) -> None:
    with pytest.raises(SystemExit, match=f"{name} must be a whole number of at least 1"):
        from_env({name: value})


def test_a_value_that_is_not_a_number_is_refused_by_name() -> None:
    with pytest.raises(SystemExit, match="PYDLIT_CONCURRENCY must be a number, not 'many'"):
        from_env({"PYDLIT_CONCURRENCY": "many"})


@pytest.mark.parametrize(("flags", "problem"), [
    (["--port", "0"], "--port must be from 1 to 65535"),
    (["--port", "65536"], "--port must be from 1 to 65535"),
    (["--concurrency", "-1"], "--concurrency must be 0"),
])
def test_a_flag_out_of_its_range_stops_the_start_naming_it(flags: list[str], problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        parse_args(flags)
    assert stop.value.code == 2 and problem in capsys.readouterr().err
