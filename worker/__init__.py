"""Notification delivery worker: RabbitMQ in, a flaky HTTP provider out, PostgreSQL as record."""
