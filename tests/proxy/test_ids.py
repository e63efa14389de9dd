"""Request and hold ids: unique within a process, and a forked child's never share its parent's prefix."""

from __future__ import annotations

import os
import re

from proxy.ids import new_id


def test_ids_keep_their_kind_and_shape():
    assert re.fullmatch(r"hold_[0-9a-f]{24}", new_id("hold_"))
    assert re.fullmatch(r"req_[0-9a-f]{24}", new_id("req_"))


def test_a_process_never_repeats_an_id():
    ids = [new_id("hold_") for _ in range(100_000)]
    assert len(set(ids)) == len(ids)


def test_a_forked_child_draws_its_own_prefix():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report an id and leave at once
        os.write(write, new_id("hold_").encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    ours = new_id("hold_")
    assert child[5:17] != ours[5:17]
