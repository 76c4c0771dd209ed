"""The Python peer of Eddy's four shipped plugins, as a user of the seed systems writes them:
one process and one consumer group per job, confluent-kafka, json.loads, dicts and counters.

    python3 jobs.py JOB --bootstrap HOST:PORT --topic TOPIC --events N [--group G]

JOB is logger, analytics, alert or fraud (or count: the ceiling, see Count); each does what the plugin of that name does with
the shipped plugins.toml (the same sampling, counters, top lists, rules and scoring), and
produces its output records to Kafka as the host does (topic `peer-<job>`). The process
stops once it has handled N events and prints one JSON line: the job, the events handled,
and the seconds from its first event to its last (its outputs flushed).

Run by `make bench-peer` (host/benches/peer.rs), which makes the venv with confluent-kafka.
"""

import argparse
import json
import sys
import time
from collections import Counter, defaultdict, deque

from confluent_kafka import Consumer, Producer


def amount(e):
    """What the SDK's Activity::amount gives: price x quantity, else the cart value."""
    p = e.get("properties") or {}
    price = p.get("price")
    if isinstance(price, (int, float)):
        q = p.get("quantity")
        return float(price) * (q if isinstance(q, int) and q > 0 else 1)
    cart = p.get("cart_value")
    return float(cart) if isinstance(cart, (int, float)) else None


def country(e):
    loc = e.get("location") or {}
    return loc.get("country")


class Logger:
    """One JSON line for one event in 10 (sampled by offset), like the logger plugin."""

    def __init__(self, emit):
        self.emit = emit

    def handle(self, msg, e):
        if msg.offset() % 10 != 0:
            return
        line = {"partition": msg.partition(), "offset": msg.offset()}
        for k in ("timestamp", "user_id", "event_type", "page_url"):
            if e.get(k) is not None:
                line[k] = e[k]
        pid = (e.get("properties") or {}).get("product_id")
        if pid is not None:
            line["product_id"] = pid
        if e.get("event_type") in ("purchase", "add_to_cart"):
            a = amount(e)
            if a is not None:
                line["amount"] = a
        c = country(e)
        if c is not None:
            line["country"] = c
        self.emit(msg.key(), json.dumps(line))


class Top:
    """The n largest counters, kept as they grow (as the analytics plugin keeps them)."""

    def __init__(self, n):
        self.n = n
        self.entries = {}

    def grew(self, name, count):
        if name in self.entries or len(self.entries) < self.n:
            self.entries[name] = count
            return
        low = min(self.entries.items(), key=lambda kv: (kv[1], kv[0]))
        if count > low[1]:
            del self.entries[low[0]]
            self.entries[name] = count

    def list(self):
        return sorted(self.entries.items(), key=lambda kv: (-kv[1], kv[0]))


class Analytics:
    """The analytics plugin's counters, funnel, revenue and top lists; a snapshot every 200
    events (snapshot_every = 200, top_n = 3 in the shipped plugins.toml)."""

    FUNNEL = {"page_view": (1, "page_view"), "add_to_cart": (2, "add_to_cart"),
              "purchase": (4, "purchase")}

    def __init__(self, emit):
        self.emit = emit
        self.total = 0
        self.by_type = Counter()
        self.users = Counter()
        self.journey = defaultdict(int)
        self.funnel = Counter()
        self.pages = Counter()
        self.countries = Counter()
        self.revenue_total = 0.0
        self.revenue = defaultdict(float)
        self.products = Counter()
        self.top_users, self.top_pages, self.top_products = Top(3), Top(3), Top(3)

    def handle(self, msg, e):
        self.total += 1
        t = e["event_type"]
        user = e["user_id"]
        self.by_type[t] += 1
        self.users[user] += 1
        self.top_users.grew(user, self.users[user])
        stage = self.FUNNEL.get(t)
        if stage and not self.journey[user] & stage[0]:
            self.journey[user] |= stage[0]
            self.funnel[stage[1]] += 1
        if t == "page_view" and e.get("page_url"):
            self.pages[e["page_url"]] += 1
            self.top_pages.grew(e["page_url"], self.pages[e["page_url"]])
        c = country(e)
        if c:
            self.countries[c] += 1
        if t == "purchase":
            a = amount(e) or 0.0
            self.revenue_total += a
            ts = e.get("timestamp")
            if ts:
                self.revenue[ts[:13]] += a
            p = e.get("properties") or {}
            product = p.get("product_name") or p.get("product_id")
            if product:
                self.products[product] += max(p.get("quantity") or 1, 1)
                self.top_products.grew(product, self.products[product])
        if self.total % 200 == 0:
            self.snapshot()

    def snapshot(self):
        viewed = self.funnel["page_view"]
        snap = {
            "total_events": self.total,
            "malformed_events": 0,
            "distinct_users": len(self.users),
            "by_type": dict(sorted(self.by_type.items())),
            "funnel": dict(sorted(self.funnel.items())),
            "conversion_rate": self.funnel["purchase"] / viewed if viewed else 0.0,
            "top_pages": self.top_pages.list(),
            "top_products": self.top_products.list(),
            "top_users": self.top_users.list(),
            "countries": dict(sorted(self.countries.items())),
            "revenue_total": round(self.revenue_total, 2),
            "revenue_by_hour": [(h, round(v, 2)) for h, v in
                                sorted(self.revenue.items(), reverse=True)[:24]],
        }
        self.emit(None, json.dumps(snap))


class Alert:
    """The shipped alert rules: a purchase of at least 500, and any quiz submission."""

    def __init__(self, emit):
        self.emit = emit
        self.rules = [
            {"name": "high-value-purchase", "event_type": "purchase", "min_amount": 500.0,
             "severity": "high"},
            {"name": "quiz-completed", "event_type": "quiz_submission", "severity": "info"},
        ]

    def handle(self, msg, e):
        for r in self.rules:
            if e.get("event_type") != r["event_type"]:
                continue
            a = amount(e)
            if "min_amount" in r and (a is None or a < r["min_amount"]):
                continue
            alert = {"kind": "alert", "rule": r["name"], "severity": r["severity"],
                     "user_id": e["user_id"], "event_type": e["event_type"],
                     "partition": msg.partition(), "offset": msg.offset()}
            if a is not None:
                alert["amount"] = a
            for k in ("event_id", "timestamp"):
                if e.get(k):
                    alert[k] = e[k]
            self.emit(e["user_id"].encode(), json.dumps(alert))


def parse_ms(ts):
    """Milliseconds of `2024-01-15T10:30:45.123Z` (the generator's format)."""
    from datetime import datetime
    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


class Fraud:
    """The fraud plugin's scoring with the shipped settings: a 60 s window per user of at most
    50 events; velocity, high value (1000), IP addresses and countries; alert at 70."""

    WINDOW_MS, MAX_TRACKED, MAX_PURCHASES = 60_000, 50, 3
    HIGH_VALUE, MAX_IPS, MAX_COUNTRIES, ALERT_SCORE = 1000.0, 2, 1, 70

    def __init__(self, emit):
        self.emit = emit
        self.recent = defaultdict(deque)

    def handle(self, msg, e):
        ts = e.get("timestamp")
        now = parse_ms(ts) if ts else msg.timestamp()[1]
        recent = self.recent[e["user_id"]]
        while recent and not (now - self.WINDOW_MS < recent[0][0] <= now):
            recent.popleft()
        t = e["event_type"]
        recent.append((now, e.get("ip_address"), country(e), t == "purchase"))
        while len(recent) > self.MAX_TRACKED:
            recent.popleft()
        if t not in ("purchase", "add_to_cart"):
            return
        score, reasons = 0, []
        purchases = sum(1 for r in recent if r[3])
        if purchases > self.MAX_PURCHASES:
            score += 40
            reasons.append(f"{purchases} purchases within 60s")
        a = amount(e) if t == "purchase" else None
        if a is not None and a >= self.HIGH_VALUE:
            score += 30
            reasons.append(f"high-value purchase of {a:.2f}")
        ips = {r[1] for r in recent if r[1]}
        if len(ips) > self.MAX_IPS:
            score += 30
            reasons.append(f"{len(ips)} IP addresses within 60s")
        countries = sorted({r[2] for r in recent if r[2]})
        if len(countries) > self.MAX_COUNTRIES:
            score += 40
            reasons.append(f"{len(countries)} countries within 60s ({', '.join(countries)})")
        score = min(score, 100)
        if score >= self.ALERT_SCORE:
            alert = {"kind": "fraud", "user_id": e["user_id"], "score": score,
                     "reasons": reasons, "event_type": t, "amount": amount(e),
                     "event_id": e.get("event_id"), "partition": msg.partition(),
                     "offset": msg.offset()}
            self.emit(e["user_id"].encode(), json.dumps(alert))


class Count:
    """Nothing but counting (no parse, no output): the ceiling of a Python consumer on this
    broker, which the benchmark reports next to the jobs."""

    def __init__(self, emit):
        pass

    def handle(self, msg, e):
        pass


JOBS = {"logger": Logger, "analytics": Analytics, "alert": Alert, "fraud": Fraud,
        "count": Count}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("job", choices=sorted(JOBS))
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", default="user-activities")
    ap.add_argument("--events", type=int, required=True)
    ap.add_argument("--group")
    args = ap.parse_args()

    consumer = Consumer({
        "bootstrap.servers": args.bootstrap,
        "group.id": args.group or f"peer-{args.job}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": True,
    })
    producer = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 5})
    out_topic = f"peer-{args.job}"

    def emit(key, value):
        while True:
            try:
                producer.produce(out_topic, value=value, key=key)
                return
            except BufferError:
                producer.poll(0.05)

    job = JOBS[args.job](emit)
    consumer.subscribe([args.topic])
    handled, first = 0, None
    while handled < args.events:
        for msg in consumer.consume(num_messages=500, timeout=0.1):
            if msg.error():
                continue
            if first is None:
                first = time.monotonic()
            if args.job == "count":
                handled += 1
                continue
            try:
                event = json.loads(msg.value())
            except ValueError:
                event = None
            if isinstance(event, dict) and "event_type" in event and "user_id" in event:
                job.handle(msg, event)
            handled += 1
        producer.poll(0)
    producer.flush()
    done = time.monotonic()
    consumer.commit(asynchronous=False)
    consumer.close()
    print(json.dumps({"job": args.job, "events": handled, "seconds": done - first}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
