"""The one training loop, loss normalisation, schedules and evaluation."""
