"""How microscope file names map to a stack id and a channel.

Acquisition software names files its own way, so the mapping is a regular expression with
named groups, set in the configuration. `channel` is required; the stack id comes from an
`id` group, or is built from `plate`, `well` and `site` groups when there is no `id`.
A `channel_map` turns the software's channel tokens ("w1", "DAPI") into red/green/blue/yellow.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.stacks.labels import CHANNELS

KAGGLE_PATTERN = r"^(?P<id>.+)_(?P<channel>red|green|blue|yellow)\.(?:png|tiff?)$"
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
LOCATION_GROUPS = ("plate", "well", "site")
# A stack id becomes part of file names in done/ and failed/ and of MQTT payloads, so it
# must be a plain name: no path separators, no control characters, no leading dot.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@,-]{0,199}$")


@dataclass(frozen=True)
class ChannelName:
    """What one file name says: which stack, which channel, and where on the plate."""

    stack_id: str
    channel: str
    plate: str | None = None
    well: str | None = None
    site: str | None = None


@dataclass(frozen=True)
class NamingScheme:
    pattern: str = KAGGLE_PATTERN
    channel_map: Mapping[str, str] = field(default_factory=dict)
    ignore_case: bool = True

    def __post_init__(self) -> None:
        try:
            regex = re.compile(self.pattern, re.IGNORECASE if self.ignore_case else 0)
        except re.error as exc:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {exc}") from None
        groups = set(regex.groupindex)
        if "channel" not in groups:
            raise ValueError(f"pattern {self.pattern!r} has no (?P<channel>...) group")
        if "id" not in groups and not groups & set(LOCATION_GROUPS):
            raise ValueError(
                f"pattern {self.pattern!r} needs an (?P<id>...) group, "
                "or plate/well/site groups to build the id from"
            )
        bad = sorted(set(self.channel_map.values()) - set(CHANNELS))
        if bad:
            raise ValueError(f"channel_map maps to {bad}; allowed targets are {list(CHANNELS)}")
        object.__setattr__(self, "_regex", regex)

    def parse(self, filename: str) -> ChannelName | None:
        """Return what `filename` names, or None when it is not a channel file of this scheme.

        Hidden files, editor and transfer temporaries never match, whatever the pattern says.
        """
        if is_temporary(filename):
            return None
        match = self._regex.match(filename)  # type: ignore[attr-defined]
        if match is None:
            return None
        parts = match.groupdict()
        token = parts["channel"]
        channel = self.channel_map.get(token, token.lower())
        if channel not in CHANNELS:
            return None
        place = {key: parts.get(key) for key in LOCATION_GROUPS}
        stack_id = parts.get("id") or "_".join(v for v in place.values() if v)
        if not _SAFE_ID.match(stack_id):
            return None
        return ChannelName(stack_id, channel, place["plate"], place["well"], place["site"])

    def unsafe(self, filename: str) -> str | None:
        """The channel of a file this scheme names but whose stack id is not a plain name
        (control characters, backslashes, spaces...); None for every other file. Such a file
        cannot become a stack, and leaving it in the folder would lose it, so the agent moves
        it aside with an error."""
        if is_temporary(filename):
            return None
        match = self._regex.match(filename)  # type: ignore[attr-defined]
        if match is None:
            return None
        channel = self.channel_map.get(match["channel"], match["channel"].lower())
        if channel not in CHANNELS or self.parse(filename) is not None:
            return None
        return str(channel)

    def group(self, filenames: Iterable[str]) -> dict[str, dict[str, str]]:
        """Group file names into {stack_id: {channel: filename}}; non-matching names are skipped.

        When two files claim the same channel of a stack (x_red.png and x_red.tif), the
        first in sorted order wins so the choice is repeatable.
        """
        return group_parsed((name, self.parse(name)) for name in filenames)


def group_parsed(named: Iterable[tuple[str, ChannelName | None]]) -> dict[str, dict[str, str]]:
    """`NamingScheme.group` for names parsed already: the tracker parses a file once, when it
    first sees it, not at every look (a look at a folder of 4,000 files parsed them all)."""
    stacks: dict[str, dict[str, str]] = {}
    for name, parsed in sorted(named, key=lambda item: item[0]):
        if parsed is not None:
            stacks.setdefault(parsed.stack_id, {}).setdefault(parsed.channel, name)
    return stacks


def is_temporary(filename: str) -> bool:
    """Files that are being written or are not meant for us: dotfiles, ~ backups, partials."""
    lowered = filename.lower()
    return (
        filename.startswith((".", "~"))
        or filename.endswith("~")
        or lowered.endswith((".tmp", ".part", ".partial", ".crdownload", ".swp"))
    )
