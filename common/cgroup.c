/* cgroup.c: AttachProcessesToUnit over sd-bus: a server leaves the worker's cgroup for the holder unit's. */
#include "cgroup.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-bus.h>

const char *bw_cgroup_holder(void)
{
	const char *id = getenv("INVOCATION_ID"); /* set by systemd for every unit's processes */
	return id != NULL && id[0] != '\0' ? BW_CGROUP_HOLDER_UNIT : NULL;
}

int bw_cgroup_attach(const char *unit, pid_t pid, char *err, size_t errsize)
{
	sd_bus *bus = NULL;
	sd_bus_error e = SD_BUS_ERROR_NULL;
	sd_bus_message *reply = NULL;
	int rc;

	int r = sd_bus_open_system(&bus);
	if (r < 0) {
		snprintf(err, errsize, "system bus: %s", strerror(-r));
		rc = BW_EIO;
		goto out;
	}
	(void)sd_bus_set_method_call_timeout(bus, (uint64_t)BW_CGROUP_CALL_TIMEOUT_MS * 1000);
	/* "": the unit's own cgroup, no subgroup (a server's exit leaves nothing to remove) */
	r = sd_bus_call_method(bus, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
			       "org.freedesktop.systemd1.Manager", "AttachProcessesToUnit", &e, &reply,
			       "ssau", unit, "", 1, (uint32_t)pid);
	if (r < 0) {
		snprintf(err, errsize, "AttachProcessesToUnit %s pid %ld: %s", unit, (long)pid,
			 e.message ? e.message : strerror(-r));
		rc = sd_bus_error_is_set(&e) && !sd_bus_error_has_name(&e, SD_BUS_ERROR_NO_REPLY) &&
				     !sd_bus_error_has_name(&e, SD_BUS_ERROR_TIMEOUT)
			     ? BW_EPERM
			     : BW_EIO;
		goto out;
	}
	rc = 0;
out:
	sd_bus_message_unref(reply);
	sd_bus_error_free(&e);
	sd_bus_flush_close_unref(bus);
	return rc;
}
