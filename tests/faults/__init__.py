"""The fault suite (issue 10): real hub processes against private services, each hit by one hard fault.

Every scenario drives mixed writes through the gRPC client, records each write as acknowledged,
failed or unknown (:mod:`faults.load`), and ends with the same checks (:mod:`faults.checks`):
every acknowledged write is in SQL at its version or newer, replaying the event log into an empty
database gives the live checksum, and new writes succeed without manual steps. Each scenario prints
its figures as one ``name=value`` line, repeated in pytest's terminal summary.

The scenarios run in the default test command (marked ``slow``; about five minutes on two cores).
``pytest tests/faults -s`` runs only them and shows each line as its scenario ends. They start
their own redis-server (AOF on), nats-server and hub processes on free loopback ports; Postgres
scenarios use a fresh database on the test Postgres (``MFH_TEST_POSTGRES_URL``) behind a TCP proxy.
The write-behind settings are the shipped ones, so the recovery bounds are those an operator gets.
"""
