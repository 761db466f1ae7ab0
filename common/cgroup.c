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

int bw_cgroup_attach(const char *unit, const pid_t *pids, size_t n, char *err, size_t errsize)
{
	sd_bus *bus = NULL;
	sd_bus_error e = SD_BUS_ERROR_NULL;
	sd_bus_message *call = NULL, *reply = NULL;
	int rc;

	int r = sd_bus_open_system(&bus);
	if (r < 0) {
		snprintf(err, errsize, "system bus: %s", strerror(-r));
		rc = BW_EIO;
		goto out;
	}
	(void)sd_bus_set_method_call_timeout(bus, (uint64_t)BW_CGROUP_CALL_TIMEOUT_MS * 1000);
	/* "": the unit's own cgroup, no subgroup (a server's exit leaves nothing to remove) */
	r = sd_bus_message_new_method_call(bus, &call, "org.freedesktop.systemd1",
					   "/org/freedesktop/systemd1",
					   "org.freedesktop.systemd1.Manager", "AttachProcessesToUnit");
	if (r >= 0)
		r = sd_bus_message_append(call, "ss", unit, "");
	if (r >= 0)
		r = sd_bus_message_open_container(call, 'a', "u");
	for (size_t i = 0; r >= 0 && i < n; i++)
		r = sd_bus_message_append(call, "u", (uint32_t)pids[i]);
	if (r >= 0)
		r = sd_bus_message_close_container(call);
	if (r >= 0)
		r = sd_bus_call(bus, call, 0, &e, &reply);
	if (r < 0) {
		snprintf(err, errsize, "AttachProcessesToUnit %s: %s", unit,
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
	sd_bus_message_unref(call);
	sd_bus_error_free(&e);
	sd_bus_flush_close_unref(bus);
	return rc;
}
