"""The flow log: GetFlowsResponse JSON lines written off the caller's thread, rotated by
size into FILE.1 ... FILE.N, chosen by allow/deny FlowFilters in Hubble exporter's JSON,
and read back from its tail (across backups) to refill the store after a restart."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from membrane.errors import UserError
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2
from membrane.observe import flowlog
from membrane.observe.flowlog import (
    FlowLog,
    FlowLogSettings,
    make_settings,
    parse_filters,
    read_tail,
)
from membrane.observe.format import json_line, parse_response
from membrane.observe.record import flow_response, lost_response

Response = observer_pb2.GetFlowsResponse


def flow(n: int, namespace: str = "shop", verdict: int = flow_pb2.FORWARDED) -> Response:
    f = flow_pb2.Flow(uuid=f"{n:06d}", verdict=verdict, node_name="n1")
    f.source.namespace = namespace
    f.time.FromNanoseconds(n * 1_000_000_000)
    return flow_response(f)


def lines(path: Path) -> list[Response]:
    return [parse_response(json.loads(line)) for line in path.read_text().splitlines()]


def uuids(items: list[Response]) -> list[str]:
    return [r.flow.uuid for r in items if r.HasField("flow")]


def write_all(settings: FlowLogSettings, items: list[Response], batch: int = 10) -> FlowLog:
    log = FlowLog(settings, "n1")
    for i in range(0, len(items), batch):
        log.submit(items[i : i + batch])
    log.close()  # waits for the writer to finish the queue
    return log


def test_lines_are_get_flows_responses(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    items = [flow(1), lost_response(flow_pb2.PERF_EVENT_RING_BUFFER, 3, "n1"), flow(2)]
    log = write_all(FlowLogSettings(str(path)), items)
    assert lines(path) == items and log.written == 3
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)


def test_rotation_by_size_keeps_max_backups(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    settings = FlowLogSettings(str(path), max_size_mb=1, max_backups=3)
    count = int(2.5 * (1 << 20) / (len(json_line(flow(5000))) + 1))  # 2.5 MiB of lines
    write_all(settings, [flow(i) for i in range(count)], batch=500)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["flows.log", "flows.log.1", "flows.log.2"], names
    assert all(p.stat().st_size <= 1 << 20 for p in tmp_path.iterdir())
    # newest in FILE, older in FILE.1, FILE.2: together every flow, in order
    kept = [uuids(lines(path.with_name(n))) for n in ("flows.log.2", "flows.log.1", "flows.log")]
    assert [u for part in kept for u in part] == [f"{i:06d}" for i in range(count)]


def test_rotation_drops_the_oldest_backup(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    settings = FlowLogSettings(str(path), max_size_mb=1, max_backups=1)
    write_all(settings, [flow(i) for i in range(30000)], batch=1000)  # ~4 MiB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flows.log", "flows.log.1"]
    newest = uuids(lines(path))
    assert newest[-1] == "029999"
    assert uuids(lines(path.with_name("flows.log.1")))[-1] == f"{int(newest[0]) - 1:06d}"


def test_allowlist_and_denylist(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    settings = make_settings(
        str(path),
        allowlist='{"source_pod":["shop/"]}{"verdict":["DROPPED"]}',  # Hubble's form
        denylist='[{"verdict":["DROPPED"], "source_pod":["shop/"]}]',
    )
    assert settings is not None
    items = [
        flow(1, "shop"),  # allowed by the first filter
        flow(2, "other"),  # neither
        flow(3, "other", flow_pb2.DROPPED),  # allowed by the second
        flow(4, "shop", flow_pb2.DROPPED),  # allowed, then denied
        lost_response(flow_pb2.PERF_EVENT_RING_BUFFER, 1, "n1"),  # notices always
    ]
    write_all(settings, items)
    got = lines(path)
    assert uuids(got) == ["000001", "000003"]
    assert got[-1].HasField("lost_events")


@pytest.mark.parametrize(
    ("option", "text", "words"),
    [
        ("flow-log-allowlist", "{nope", "not JSON"),
        ("flow-log-allowlist", "[1]", "not a FlowFilter object"),
        ("flow-log-denylist", '{"source_pods":["x"]}', "not a FlowFilter"),
        ("flow-log-denylist", '{"source_ip":["1.2.3"]}', "source_ip"),
        ("flow-log-allowlist", '{"destination_port":["http"]}', "destination_port"),
    ],
)
def test_bad_filters_name_the_flag(tmp_path: Path, option: str, text: str, words: str) -> None:
    kw = {"allowlist" if option.endswith("allowlist") else "denylist": text}
    with pytest.raises(UserError) as err:
        make_settings(str(tmp_path / "f.log"), **kw)  # type: ignore[arg-type]
    assert err.value.field == option
    assert words in err.value.problem


def test_settings_are_checked(tmp_path: Path) -> None:
    assert make_settings("") is None
    for kw, field in (
        ({"max_size_mb": "0"}, "flow-log-max-size-mb"),
        ({"max_size_mb": "ten"}, "flow-log-max-size-mb"),
        ({"max_backups": "-1"}, "flow-log-max-backups"),
    ):
        with pytest.raises(UserError) as err:
            make_settings(str(tmp_path / "f.log"), **kw)  # type: ignore[arg-type]
        assert err.value.field == field
    with pytest.raises(UserError) as err:
        make_settings(str(tmp_path))
    assert err.value.field == "flow-log"
    with pytest.raises(UserError) as err:
        make_settings("", allowlist='{"verdict":["DROPPED"]}')
    assert "--flow-log" in err.value.problem


def test_parse_filters_forms() -> None:
    one = parse_filters('{"source_pod":["a/"]}', "x")
    many = parse_filters('{"source_pod":["a/"]}, {"verdict":["DROPPED"]}', "x")
    listed = parse_filters('[{"source_pod":["a/"]},{"verdict":["DROPPED"]}]', "x")
    assert len(one) == 1 and many == listed and len(many) == 2
    assert parse_filters("  ", "x") == ()


def test_the_tail_refills_across_backups(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    settings = FlowLogSettings(str(path), max_size_mb=1, max_backups=3)
    write_all(settings, [flow(i) for i in range(12000)], batch=500)
    assert path.with_name("flows.log.1").exists()
    in_file = len(uuids(lines(path)))
    tail = read_tail(settings, in_file + 100)  # reaches into FILE.1
    assert uuids(tail) == [f"{i:06d}" for i in range(12000 - in_file - 100, 12000)]
    assert uuids(read_tail(settings, 3)) == ["011997", "011998", "011999"]


def test_the_tail_skips_a_line_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    settings = FlowLogSettings(str(path))
    write_all(settings, [flow(i) for i in range(5)])
    with open(path, "a") as f:
        f.write('{"flow":{"uuid":"cut')  # a crash in the middle of a write
    assert uuids(read_tail(settings, 10)) == [f"{i:06d}" for i in range(5)]
    assert read_tail(FlowLogSettings(str(tmp_path / "none.log")), 10) == []


def test_submit_never_waits_and_counts_what_it_drops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flowlog, "QUEUE_BATCHES", 8)
    path = tmp_path / "flows.log"
    log = FlowLog(FlowLogSettings(str(path)), "n1")
    batch = [flow(i) for i in range(10)]
    for _ in range(1000):  # far more batches than the queue holds
        log.submit(batch)
    log.close()
    got = lines(path)
    lost = sum(r.lost_events.num_events_lost for r in got if r.HasField("lost_events"))
    assert lost == log.lost
    assert log.lost > 0 and len(uuids(got)) + log.lost == 10000
