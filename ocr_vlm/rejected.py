"""The one way input is turned away: a manifest record, a shard sample, an image, or a run of samples a damaged tar
could not deliver. `reason` is what counters, index.json and logs count it under; the message names what is wrong."""

from __future__ import annotations


class Rejected(ValueError):
    def __init__(self, reason: str, message: str, where: str = "", count: int = 1, first: int = 0):
        super().__init__(message)
        self.reason = reason
        self.where = where        # the shard (or shard:key) it came from, when it came from one
        self.count = count        # samples it stands for: more than 1 only for the unread rest of a damaged tar
        self.first = first        # index in the tar `where` of the first of them
