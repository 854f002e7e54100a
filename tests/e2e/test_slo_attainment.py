"""The scheduler judges every finished request against its SLO targets, where the HTTP layer ends it.

A real scheduler and reference workers; the targets are set so that every first token is in time
and no decode can be (1 microsecond per token). A request refused for lack of capacity (429) counts
as a TTFT miss. The attainment the autoscaler reads is exported as ``pdorch_slo_attainment``; the
TPOT margin placement learnt from those misses as ``pdorch_placement_tpot_margin``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import MODEL, complete

pytestmark = pytest.mark.e2e

CONFIG = """
slo: {ttft_s: 120, tpot_s: 0.000001, window_s: 600, min_requests: 2}
# One request at a time, and a short wait for room: a second request is turned away with a 429.
admission: {max_inflight: 1}
queue_timeout_s: 0.5
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    root: Path = tmp_path_factory.mktemp("slo")
    config = root / "scheduler.yaml"
    config.write_text(CONFIG)
    c = start_cluster(root, scheduler_args=["--config", str(config)])
    yield c
    c.stop()


async def _attainment(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    return {
        m[1]: float(m[2]) for m in re.finditer(r'^pdorch_slo_attainment\{phase="(\w+)"\} (\S+)$', text, re.M)
    }


async def test_finished_and_refused_requests_are_judged(cluster: LocalCluster) -> None:
    url = cluster.url
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        assert await _attainment(s, url) == {}  # nothing judged yet: unknown, not 100%
        for _ in range(2):
            await complete(s, url, prompt="slo", max_tokens=4, temperature=0)
        assert await _attainment(s, url) == {"ttft": 1.0, "tpot": 0.0}
        # Both missed their TPOT objective, so placement keeps a share of it in reserve now.
        async with s.get(url + "/metrics") as r:
            margins = re.findall(
                r'^pdorch_placement_tpot_margin\{node_class="[^"]+"\} (\S+)$', await r.text(), re.M
            )
        assert margins and max(float(m) for m in margins) > 0, margins

        # A long request holds the only slot; the next one waits 0.5 s for room and gets a 429.
        body = {"model": MODEL, "prompt": "hold", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        async with s.post(url + "/v1/completions", json=body) as long:
            assert long.status == 200
            await long.content.readline()  # the first token is out: it is running
            async with s.post(url + "/v1/completions", json={**body, "stream": False}) as refused:
                assert refused.status == 429
        # 3 of the 4 judged requests got their first token in time (the long one was cut short by
        # its client, which does not make it miss; it is judged once its handler has ended).
        deadline = asyncio.get_running_loop().time() + 10
        while (ttft := (await _attainment(s, url))["ttft"]) != pytest.approx(3 / 4):
            assert ttft == pytest.approx(2 / 3), ttft  # the 429 is judged before the client sees it
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
