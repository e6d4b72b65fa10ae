#!/usr/bin/env python3
"""Turn the seed's markdown (the 35 streaming systems) into the runtime's catalogue.json.

Usage:
    python3 tools/seed_to_catalogue.py path/to/streaming-systems.md \
        > crates/tributary-runtime/catalogue.json

Python 3.11, standard library only. Run once when the seed changes; the JSON is committed and
embedded by `tributary-runtime` with `include_str!`, so nothing at build or run time needs Python.

What it parses, per `## N. Title` section: the `**ID:**`/`**Category:**`/`**Difficulty:**` lines,
the `### Summary` .. `### Reference Solution` sections, and the closing table "The seed's generic
capacity plan". Raw seed text is kept next to every parsed number so nothing is lost.

Parsing rules (each one is a choice; the Rust docs repeat them):
- Latency: the first `P<pct> < <n><ms|s|min>` of the Latency line (`P95 < 5s ...` -> 5000 ms).
- Request rate: the first `<n>[k|M|B] <unit>/<sec|hour|day>` of the Request Rate line, as a rate
  per second (`500k hours/day` -> 5.787/s). `... normal, <n>[k|M|B] during ...` gives a peak rate.
- Dataset: the first byte quantity (`30TB`) and the first count with a k/M/B suffix (`1M messages`).
- Availability: the first percentage.
- Reference components: `redirect_client` becomes `client`. When a sentence of the reference
  text says "<n> partitions", the stream it speaks of (the only stream component, or the one
  named in that sentence) gets `params.partitions = n`: the seed states it in prose only.

The script fails loudly (non-zero exit) on any section it cannot read rather than guessing.
"""

from __future__ import annotations

import json
import re
import sys

KINDS = {
    "client", "lb", "app", "stream", "queue", "worker", "cache",
    "db_primary", "db_replica", "search", "cdn",
}
MAGNITUDE = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9}
BYTES = {"GB": 1e9, "TB": 1e12, "PB": 1e15, "EB": 1e18}
PER_SECONDS = {"sec": 1.0, "s": 1.0, "hour": 3600.0, "day": 86400.0}
LATENCY_MS = {"ms": 1.0, "s": 1000.0, "min": 60000.0}
NUMBER = r"(\d+(?:\.\d+)?)"


class SeedError(Exception):
    pass


def number_value(text: str) -> float | None:
    """A constant's value as a number, or None when it is not one (e.g. `true`)."""
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value


def json_number(value: float) -> int | float:
    """Whole numbers print as integers so the JSON reads like the seed."""
    return int(value) if value == int(value) and abs(value) < 2**53 else value


def parse_latency(text: str) -> dict | None:
    match = re.search(r"P(\d+(?:\.\d+)?)\s*<\s*" + NUMBER + r"\s*(ms|s|min)\b", text)
    if match is None:
        return None
    percentile = float(match.group(1))
    if percentile != int(percentile):
        raise SeedError(f"primary latency percentile is not whole: {text!r}")
    ms = float(match.group(2)) * LATENCY_MS[match.group(3)]
    return {"percentile": int(percentile), "ms": json_number(ms)}


def parse_claimed_latency(text: str) -> list[dict]:
    out = []
    for match in re.finditer(r"P(\d+):\s*" + NUMBER + r"\s*(ms|s|min)\b", text):
        ms = float(match.group(2)) * LATENCY_MS[match.group(3)]
        out.append({"percentile": int(match.group(1)), "ms": json_number(ms)})
    if not out:
        raise SeedError(f"no latency in the capacity plan's claim: {text!r}")
    return out


def parse_rate(text: str) -> tuple[float, str, float | None] | None:
    match = re.search(
        NUMBER + r"([kMB]?)\s+([A-Za-z][A-Za-z ]*?)/(sec|s|hour|day)\b", text
    )
    if match is None:
        return None
    per_unit = float(match.group(1)) * MAGNITUDE[match.group(2)]
    rate = per_unit / PER_SECONDS[match.group(4)]
    unit = match.group(3).strip()
    peak = None
    peak_match = re.search(r"normal,\s*" + NUMBER + r"([kMB]?)\s+during\b", text)
    if peak_match is not None:
        peak = float(peak_match.group(1)) * MAGNITUDE[peak_match.group(2)]
        peak /= PER_SECONDS[match.group(4)]
    return rate, unit, peak


def parse_dataset(text: str) -> dict | None:
    dataset = {}
    size = re.search(NUMBER + r"\s*(GB|TB|PB|EB)\b", text)
    if size is not None:
        dataset["bytes"] = json_number(float(size.group(1)) * BYTES[size.group(2)])
    count = re.search(NUMBER + r"([kMB])\s+[A-Za-z]", text)
    if count is not None:
        dataset["count"] = json_number(float(count.group(1)) * MAGNITUDE[count.group(2)])
    return dataset or None


def parse_availability(text: str) -> dict | None:
    match = re.search(NUMBER + r"%", text)
    if match is None:
        return None
    return {"percent": json_number(float(match.group(1)))}


def split_sections(body: str) -> dict[str, str]:
    """`### Name` headings to the text under them."""
    sections: dict[str, str] = {}
    parts = re.split(r"^### (.+)$", body, flags=re.MULTILINE)
    for name, text in zip(parts[1::2], parts[2::2]):
        if name in sections:
            raise SeedError(f"section {name!r} appears twice")
        sections[name.strip()] = text.strip()
    return sections


def bullets(text: str) -> list[str]:
    return [line[2:].strip() for line in text.splitlines() if line.startswith("- ")]


def bold_fields(text: str) -> dict[str, str]:
    """`- **Name:** value` lines (the dash is optional) to a name -> value map."""
    fields = {}
    for match in re.finditer(r"^(?:- )?\*\*([^*]+):\*\*\s*(.*)$", text, flags=re.MULTILINE):
        fields[match.group(1).strip()] = match.group(2).strip()
    return fields


def parse_tiers(text: str) -> list[dict]:
    tiers = []
    for line in text.splitlines():
        heading = re.match(r"^\*\*(T\d+):\s*(.+?)\*\*$", line.strip())
        if heading is not None:
            tiers.append({"name": heading.group(1), "title": heading.group(2), "rules": []})
        elif line.strip().startswith("- "):
            if not tiers:
                raise SeedError(f"tier rule before any tier: {line!r}")
            tiers[-1]["rules"].append(line.strip()[2:].strip())
        elif line.strip():
            raise SeedError(f"unreadable tier line: {line!r}")
    return tiers


def parse_reference(text: str) -> dict:
    head, _, rest = text.partition("**Components:**")
    components_text, _, connections_text = rest.partition("**Connections:**")
    if not rest or not connections_text:
        raise SeedError("reference solution without components or connections")
    components = []
    for item in bullets(components_text):
        match = re.match(r"^(.+?) \(([a-z_]+)\)$", item)
        if match is None:
            raise SeedError(f"unreadable reference component: {item!r}")
        kind = "client" if match.group(2) == "redirect_client" else match.group(2)
        if kind not in KINDS:
            raise SeedError(f"unknown component kind: {item!r}")
        components.append({"name": match.group(1), "kind": kind})
    connections = []
    for item in bullets(connections_text):
        source, arrow, target = item.partition(" → ")
        if not arrow:
            raise SeedError(f"unreadable reference connection: {item!r}")
        connections.append({"from": source.strip(), "to": target.strip()})
    reference_text = head.strip()
    attach_partitions(reference_text, components)
    return {"text": reference_text, "components": components, "connections": connections}


def attach_partitions(text: str, components: list[dict]) -> None:
    """"Kafka with 100 partitions" in the prose -> params.partitions on that stream component.

    The stream meant is the only stream component, or else the one whose name appears in the
    same sentence as the count.
    """
    streams = [c for c in components if c["kind"] == "stream"]
    for sentence in re.split(r"(?<=\.)\s+", text):
        match = re.search(r"\b(\d+) partitions\b", sentence)
        if match is None:
            continue
        named = [c for c in streams if c["name"] in sentence]
        chosen = streams if len(streams) == 1 else named
        if len(chosen) != 1:
            raise SeedError(f"cannot tell which stream {sentence!r} means")
        chosen[0]["params"] = {"partitions": int(match.group(1))}


def parse_system(number: int, title: str, body: str) -> dict:
    fields = bold_fields(body.split("###", 1)[0])
    sections = split_sections(body)
    expected = [
        "Summary", "Goal", "Description", "Functional Requirements",
        "Non-Functional Requirements", "Constants/Assumptions", "Available Components",
        "Hints", "Tiers/Checkpoints", "Reference Solution",
    ]
    missing = [name for name in expected if name not in sections]
    if missing:
        raise SeedError(f"system {number} lacks sections {missing}")

    raw_nonfunctional = bold_fields(sections["Non-Functional Requirements"])
    nonfunctional: dict = {"raw": raw_nonfunctional}
    latency_text = raw_nonfunctional.get("Latency", "")
    nonfunctional["latency"] = parse_latency(latency_text)
    rate = parse_rate(raw_nonfunctional.get("Request Rate", ""))
    nonfunctional["rate_per_s"] = json_number(rate[0]) if rate else None
    nonfunctional["rate_unit"] = rate[1] if rate else None
    nonfunctional["rate_peak_per_s"] = json_number(rate[2]) if rate and rate[2] else None
    nonfunctional["dataset"] = parse_dataset(raw_nonfunctional.get("Dataset Size", ""))
    nonfunctional["availability"] = parse_availability(raw_nonfunctional.get("Availability", ""))

    constants = {}
    for name, raw in bold_fields(sections["Constants/Assumptions"]).items():
        value = number_value(raw)
        constants[name] = {"raw": raw, "value": None if value is None else json_number(value)}

    components = bullets(sections["Available Components"])
    unknown = [kind for kind in components if kind not in KINDS]
    if unknown:
        raise SeedError(f"system {number}: unknown available components {unknown}")

    hints = [
        re.sub(r"^\d+\.\s*", "", line.strip())
        for line in sections["Hints"].splitlines()
        if re.match(r"^\d+\.\s", line.strip())
    ]

    return {
        "number": number,
        "id": fields["ID"],
        "title": title,
        "category": fields["Category"],
        "difficulty": fields["Difficulty"],
        "summary": sections["Summary"],
        "goal": sections["Goal"],
        "description": sections["Description"],
        "functional": bullets(sections["Functional Requirements"]),
        "nonfunctional": nonfunctional,
        "constants": constants,
        "components": components,
        "hints": hints,
        "tiers": parse_tiers(sections["Tiers/Checkpoints"]),
        "reference": parse_reference(sections["Reference Solution"]),
    }


def parse_plan(text: str) -> dict[str, dict]:
    plans = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[0].isdigit():
            continue
        number, system_id, instances, total, per_request, claimed = cells
        plans[system_id] = {
            "number": int(number),
            "plan": {
                "instances": int(instances.replace(",", "")),
                "monthly_total_usd": json_number(float(total.replace(",", ""))),
                "cost_per_request_usd": float(per_request),
                "claimed_latency": parse_claimed_latency(claimed),
            },
        }
    return plans


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as seed:
        text = seed.read()

    plan_heading = "## The seed's generic capacity plan"
    systems_text, _, plan_text = text.partition(plan_heading)
    if not plan_text:
        raise SeedError("the capacity plan table is missing")
    plans = parse_plan(plan_text)

    systems = []
    parts = re.split(r"^## (\d+)\. (.+)$", systems_text, flags=re.MULTILINE)
    for number, title, body in zip(parts[1::3], parts[2::3], parts[3::3]):
        body = body.strip().removesuffix("---").strip()
        system = parse_system(int(number), title.strip(), body)
        plan = plans.get(system["id"])
        if plan is None or plan["number"] != system["number"]:
            raise SeedError(f"no capacity plan row for {system['number']} {system['id']}")
        system["template_plan"] = plan["plan"]
        systems.append(system)

    if len(plans) != len(systems):
        raise SeedError(f"{len(plans)} plan rows for {len(systems)} systems")
    catalogue = {
        "source": "seed/streaming-systems.md, via tools/seed_to_catalogue.py",
        "systems": systems,
    }
    json.dump(catalogue, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except SeedError as error:
        print(f"seed_to_catalogue: {error}", file=sys.stderr)
        sys.exit(1)
