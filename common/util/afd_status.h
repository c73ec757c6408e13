/*
 * afd_status: the one status type returned by everything in the project that can
 * fail. OK is 0, INPROGRESS is 1, errors are negative. Outputs are set only on
 * AFD_OK.
 */
#ifndef AFD_STATUS_H
#define AFD_STATUS_H

typedef enum afd_status {
    AFD_OK = 0,
    AFD_INPROGRESS = 1,
    AFD_ERR_INVALID = -1,     /* bad argument or malformed input */
    AFD_ERR_NOMEM = -2,       /* allocation failed */
    AFD_ERR_IO = -3,          /* a system call on a file or socket failed */
    AFD_ERR_FORMAT = -4,      /* a file or frame does not follow its format */
    AFD_ERR_NOT_FOUND = -5,   /* a named thing does not exist */
    AFD_ERR_RANGE = -6,       /* a size, count or id out of its bounds */
    AFD_ERR_UNSUPPORTED = -7, /* valid, but not something this build does */
    AFD_ERR_TIMEOUT = -8,
    AFD_ERR_PEER = -9,      /* a peer failed or misbehaved */
    AFD_ERR_AUTH = -10,     /* missing or wrong token / key */
    AFD_ERR_BUSY = -11,     /* no capacity now; retry later */
    AFD_ERR_CANCELED = -12, /* aborted on request */
    AFD_ERR_SHUTDOWN = -13  /* the component is stopping */
} afd_status_t;

/* Returns a short lowercase description of a status; never NULL. */
const char *afd_status_str(afd_status_t st);

/* Aborts with file and line: for internal invariants only, never for input. */
#define AFD_ASSERT(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) afd_assert_fail(#cond, __FILE__, __LINE__);                                   \
    } while (0)

_Noreturn void afd_assert_fail(const char *expr, const char *file, int line);

#endif
