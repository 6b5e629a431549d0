"""Schedules and triggers: cron math, the store, the engine-side scheduler, the client-side api."""
