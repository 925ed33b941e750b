/*
 * Independent FEC reference for ota-tools/tests/verity.rs.
 *
 * Usage: fec_encode ROOTS BLOCK_SIZE < data > parity
 *
 * Reed-Solomon comes from Phil Karn's libfec (Debian libfec-dev: init_rs_char,
 * encode_rs_char), its parameters (FEC_PARAMS) and the block interleaving
 * (fec_ecc_interleave) from AOSP's libfec header (Debian android-libfec-dev,
 * <fec/ecc.h>). The loop follows update_engine's on-device encoder: for each round,
 * gather the block_size codewords, encode each, and write their parity in order.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <fec.h>     /* Karn's libfec */
#include <fec/ecc.h> /* AOSP's libfec header */

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s ROOTS BLOCK_SIZE < data > parity\n", argv[0]);
        return 2;
    }
    int roots = atoi(argv[1]);
    size_t block_size = (size_t)strtoul(argv[2], NULL, 10);
    if (roots < 1 || roots >= FEC_RSM || block_size == 0) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }

    size_t cap = 1 << 20, len = 0;
    uint8_t *data = malloc(cap);
    for (;;) {
        if (len == cap) {
            cap *= 2;
            data = realloc(data, cap);
        }
        if (!data) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        size_t got = fread(data + len, 1, cap - len, stdin);
        if (got == 0)
            break;
        len += got;
    }
    if (len % block_size != 0) {
        fprintf(stderr, "input is not whole blocks\n");
        return 1;
    }

    int rsn = FEC_RSM - roots;
    uint64_t blocks = len / block_size;
    uint64_t rounds = fec_div_round_up(blocks, rsn);
    void *rs = init_rs_char(FEC_PARAMS(roots));
    uint8_t *msg = malloc(rsn);
    uint8_t *parity = malloc(roots);
    if (!rs || !msg || !parity) {
        fprintf(stderr, "cannot set up the encoder\n");
        return 1;
    }
    /* fec_ecc_interleave assumes FEC_BLOCKSIZE blocks; only 4096 is checked here. */
    if (block_size != FEC_BLOCKSIZE) {
        fprintf(stderr, "block size must be %d\n", FEC_BLOCKSIZE);
        return 2;
    }
    for (uint64_t i = 0; i < rounds; i++) {
        for (size_t k = 0; k < block_size; k++) {
            for (int j = 0; j < rsn; j++) {
                uint64_t pos = fec_ecc_interleave(i * rsn * block_size + j, rsn, rounds);
                msg[j] = pos < len ? data[pos + k] : 0;
            }
            encode_rs_char(rs, msg, parity);
            fwrite(parity, 1, roots, stdout);
        }
    }
    free_rs_char(rs);
    return fflush(stdout) == 0 ? 0 : 1;
}
