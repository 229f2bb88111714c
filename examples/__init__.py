"""Example data that is not part of the library: the demo ticket generator (used by tests, benchmarks and to
regenerate data/ticket_triage). Import from the repository root: ``from examples.demo_tickets import ...``."""
