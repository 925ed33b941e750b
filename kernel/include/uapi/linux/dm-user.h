/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * dm-user: the wire format between the "user" device-mapper target and the
 * daemon that serves it through /dev/dm-user/<name>.
 *
 * This header is the single source of truth for the ABI.  It is
 * binary-compatible with the dm-user target of the Android Common Kernel.
 * See Documentation/dm-user.rst for the protocol.
 */
#ifndef _UAPI_LINUX_DM_USER_H
#define _UAPI_LINUX_DM_USER_H

#include <linux/types.h>

/* Request types, kernel to daemon, in dm_user_message.type. */
#define DM_USER_REQ_MAP_READ			0
#define DM_USER_REQ_MAP_WRITE			1
#define DM_USER_REQ_MAP_FLUSH			2
#define DM_USER_REQ_MAP_DISCARD			3
#define DM_USER_REQ_MAP_SECURE_ERASE		4
#define DM_USER_REQ_MAP_WRITE_SAME		5
#define DM_USER_REQ_MAP_WRITE_ZEROES		6
#define DM_USER_REQ_MAP_ZONE_OPEN		7
#define DM_USER_REQ_MAP_ZONE_CLOSE		8
#define DM_USER_REQ_MAP_ZONE_FINISH		9
#define DM_USER_REQ_MAP_ZONE_APPEND		10
#define DM_USER_REQ_MAP_ZONE_RESET		11
#define DM_USER_REQ_MAP_ZONE_RESET_ALL		12

/*
 * Request flags in dm_user_message.flags.  The encoding is stable and does
 * not follow the kernel's internal REQ_* bit positions.
 */
#define DM_USER_REQ_MAP_FLAG_FAILFAST_DEV	0x00001
#define DM_USER_REQ_MAP_FLAG_FAILFAST_TRANSPORT	0x00002
#define DM_USER_REQ_MAP_FLAG_FAILFAST_DRIVER	0x00004
#define DM_USER_REQ_MAP_FLAG_SYNC		0x00008
#define DM_USER_REQ_MAP_FLAG_META		0x00010
#define DM_USER_REQ_MAP_FLAG_PRIO		0x00020
#define DM_USER_REQ_MAP_FLAG_NOMERGE		0x00040
#define DM_USER_REQ_MAP_FLAG_IDLE		0x00080
#define DM_USER_REQ_MAP_FLAG_INTEGRITY		0x00100
#define DM_USER_REQ_MAP_FLAG_FUA		0x00200
#define DM_USER_REQ_MAP_FLAG_PREFLUSH		0x00400
#define DM_USER_REQ_MAP_FLAG_RAHEAD		0x00800
#define DM_USER_REQ_MAP_FLAG_BACKGROUND		0x01000
#define DM_USER_REQ_MAP_FLAG_NOWAIT		0x02000
#define DM_USER_REQ_MAP_FLAG_CGROUP_PUNT	0x04000
#define DM_USER_REQ_MAP_FLAG_NOUNMAP		0x08000
#define DM_USER_REQ_MAP_FLAG_HIPRI		0x10000
#define DM_USER_REQ_MAP_FLAG_DRV		0x20000
#define DM_USER_REQ_MAP_FLAG_SWAP		0x40000

/* Response codes, daemon to kernel, in dm_user_message.type. */
#define DM_USER_RESP_SUCCESS			0
#define DM_USER_RESP_ERROR			1
#define DM_USER_RESP_UNSUPPORTED		2

/* Size of the header on the wire, in bytes. */
#define DM_USER_MESSAGE_HEADER_SIZE		40

/**
 * struct dm_user_message - header of a request or a response
 * @seq:    request number, unique per target; a response repeats it
 * @type:   DM_USER_REQ_MAP_* in a request, DM_USER_RESP_* in a response
 * @flags:  DM_USER_REQ_MAP_FLAG_* bits of the request (ignored in responses)
 * @sector: first 512-byte sector, relative to the start of the target
 * @len:    length of the request in bytes
 * @buf:    payload: the data of a WRITE request, or of a READ response
 *
 * All fields are in the byte order of the machine running the kernel.
 */
struct dm_user_message {
	__u64 seq;
	__u64 type;
	__u64 flags;
	__u64 sector;
	__u64 len;
	__u8 buf[];
};

#endif /* _UAPI_LINUX_DM_USER_H */
