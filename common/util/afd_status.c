/* afd_status: status strings and the invariant-failure path. */
#include "afd_status.h"

#include <stdio.h>
#include <stdlib.h>

const char *afd_status_str(afd_status_t st)
{
    switch (st) {
    case AFD_OK:
        return "success";
    case AFD_INPROGRESS:
        return "operation in progress";
    case AFD_ERR_INVALID:
        return "invalid argument";
    case AFD_ERR_NOMEM:
        return "out of memory";
    case AFD_ERR_IO:
        return "input/output error";
    case AFD_ERR_FORMAT:
        return "malformed data";
    case AFD_ERR_NOT_FOUND:
        return "not found";
    case AFD_ERR_RANGE:
        return "value out of range";
    case AFD_ERR_UNSUPPORTED:
        return "unsupported";
    case AFD_ERR_TIMEOUT:
        return "timed out";
    case AFD_ERR_PEER:
        return "peer failure";
    case AFD_ERR_AUTH:
        return "not authorized";
    case AFD_ERR_BUSY:
        return "resource busy";
    case AFD_ERR_CANCELED:
        return "canceled";
    case AFD_ERR_SHUTDOWN:
        return "shutting down";
    }
    return "unknown status";
}

void afd_assert_fail(const char *expr, const char *file, int line)
{
    fprintf(stderr, "assertion failed: %s (%s:%d)\n", expr, file, line);
    fflush(stderr);
    abort();
}
