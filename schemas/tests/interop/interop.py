"""Independent producers and readers for the Rust codec interop tests.

usage:
  interop.py produce OUT.json   write events serialized by confluent-kafka's
                                AvroSerializer (Confluent framing, mock schema
                                registry) and by json.dumps, with the values
                                they encode
  interop.py read-ocf FILE      print the records of an Avro object container
                                file, read by fastavro, as JSON lines

schemas/tests/interop.rs decodes the committed golden.json on every run and,
when the project venv exists, re-runs both modes.
"""

import json
import pathlib
import sys

AVRO_DIR = pathlib.Path(__file__).resolve().parents[2] / "avro"

TOPICS = {"txn": "txn.events", "click": "click.events", "label": "txn.labels"}

T0 = 1_700_000_000_000

EVENTS = [
    ("txn", 1, {
        "event_id": "t-py-1", "card_id": "c-0001", "user_id": "u-0001", "merchant_id": "m-042",
        "mcc": 5411, "amount_minor": 1999, "currency": "EUR", "country": "FR",
        "channel": "pos", "event_time": T0,
    }),
    ("txn", 2, {
        "event_id": "t-py-2", "card_id": "c-0002", "user_id": "u-ü-2", "merchant_id": "m-7",
        "mcc": 7995, "amount_minor": 123_456_789, "currency": "JPY", "country": "JP",
        "channel": "ecom", "event_time": T0 + 1, "device_id": "dev-β", "ip_country": "BR",
    }),
    ("txn", 2, {
        "event_id": "t-py-3", "card_id": "c-0003", "user_id": "u-3", "merchant_id": "m-1",
        "mcc": 6011, "amount_minor": 0, "currency": "USD", "country": "US",
        "channel": "atm", "event_time": T0 + 2, "device_id": None, "ip_country": None,
    }),
    ("click", 1, {
        "event_id": "k-py-1", "user_id": "u-0001", "session_id": "s-1", "item_id": "i-9",
        "category": "books", "action": "view", "event_time": T0,
    }),
    ("click", 2, {
        "event_id": "k-py-2", "user_id": "u-0001", "session_id": "s-1", "item_id": "i-9",
        "category": "books", "action": "add_to_cart", "event_time": T0 + 5_000, "dwell_ms": 4_200,
    }),
    ("click", 2, {
        "event_id": "k-py-3", "user_id": "u-0001", "session_id": "s-1", "item_id": "i-9",
        "category": "books", "action": "purchase", "event_time": T0 + 9_000, "dwell_ms": None,
    }),
    ("label", 1, {
        "event_id": "t-py-2", "card_id": "c-0002", "is_fraud": True,
        "fraud_type": "account_takeover", "label_time": T0 + 86_400_000,
    }),
    ("label", 1, {
        "event_id": "t-py-1", "card_id": "c-0001", "is_fraud": False,
        "fraud_type": None, "label_time": T0 + 3_600_000,
    }),
]


def produce(out):
    import confluent_kafka
    import fastavro
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    client = SchemaRegistryClient.new_client({"url": "mock://sfs-interop"})
    serializers = {}
    records = []
    for kind, version, value in EVENTS:
        key = (kind, version)
        if key not in serializers:
            text = (AVRO_DIR / f"{kind}.v{version}.avsc").read_text()
            serializers[key] = AvroSerializer(client, text)
        ctx = SerializationContext(TOPICS[kind], MessageField.VALUE)
        payload = serializers[key](value, ctx)
        records.append({"kind": kind, "format": "avro", "writer_version": version,
                        "payload_hex": payload.hex(), "expected": value})
        records.append({"kind": kind, "format": "json", "writer_version": version,
                        "payload_hex": json.dumps(value).encode().hex(), "expected": value})
    ids = sorted({int.from_bytes(bytes.fromhex(r["payload_hex"])[1:5], "big")
                  for r in records if r["format"] == "avro"})
    schemas = {str(i): client.get_schema(i).schema_str for i in ids}
    golden = {
        "producer": f"confluent-kafka {confluent_kafka.__version__} AvroSerializer, "
                    f"fastavro {fastavro.__version__}, json.dumps",
        "schemas": schemas,
        "records": records,
    }
    pathlib.Path(out).write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")


def read_ocf(path):
    import datetime

    import fastavro

    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    millis = datetime.timedelta(milliseconds=1)
    with open(path, "rb") as f:
        for record in fastavro.reader(f):
            # fastavro turns timestamp-millis into datetimes; the wire has ms.
            record = {k: (v - epoch) // millis if isinstance(v, datetime.datetime) else v
                      for k, v in record.items()}
            print(json.dumps(record, ensure_ascii=False))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "produce":
        produce(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "read-ocf":
        read_ocf(sys.argv[2])
    else:
        sys.exit(__doc__)
