/* CPU-bound work at CPL3 that checks its own result: a sieve of
 * Eratosthenes, and CRC32 computed both table-driven and bit by bit. */
#include "runtime.h"

#define SIEVE_N     1000000
#define PRIMES      78498       /* primes below 10^6 */
#define CRC_BYTES   65536
#define CRC_POLY    0xedb88320  /* CRC-32 (IEEE), reflected */
#define CRC_CHECK   0xcbf43926  /* CRC-32 of "123456789" */
#define DEFAULT_ROUNDS 200

static uint8_t composite[SIEVE_N + 1];
static uint8_t data[CRC_BYTES];
static uint32_t crc_table[256];

static unsigned sieve(void)
{
	unsigned count = 0;

	memset(composite, 0, sizeof(composite));
	for (uint64_t i = 2; i <= SIEVE_N; i++) {
		if (composite[i])
			continue;
		count++;
		for (uint64_t j = i * i; j <= SIEVE_N; j += i)
			composite[j] = 1;
	}
	return count;
}

static uint32_t crc_bitwise(uint32_t crc, const uint8_t *p, size_t n)
{
	crc = ~crc;
	while (n--) {
		crc ^= *p++;
		for (int k = 0; k < 8; k++)
			crc = crc >> 1 ^ (CRC_POLY & -(crc & 1));
	}
	return ~crc;
}

static uint32_t crc_tabled(uint32_t crc, const uint8_t *p, size_t n)
{
	crc = ~crc;
	while (n--)
		crc = crc >> 8 ^ crc_table[(crc ^ *p++) & 0xff];
	return ~crc;
}

static void crc_table_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;

		for (int k = 0; k < 8; k++)
			c = c >> 1 ^ (CRC_POLY & -(c & 1));
		crc_table[i] = c;
	}
}

/* Pseudo-random bytes, different for every round but the same on every run. */
static void fill(uint64_t seed)
{
	uint64_t x = seed * 0x9e3779b97f4a7c15ULL + 1;

	for (size_t i = 0; i < CRC_BYTES; i += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		memcpy(data + i, &x, 8);
	}
}

static int run(void *arg)
{
	uint64_t rounds = *(uint64_t *)arg;
	uint32_t total = 0;     /* CRC-32 of all rounds' data, concatenated */
	unsigned primes = 0;

	crc_table_init();
	if (crc_tabled(0, (const uint8_t *)"123456789", 9) != CRC_CHECK) {
		printf("compute: FAIL crc32(\"123456789\") is not 0x%x\n", CRC_CHECK);
		return 1;
	}
	for (uint64_t r = 0; r < rounds; r++) {
		uint32_t fast, slow;

		primes = sieve();
		if (primes != PRIMES) {
			printf("compute: FAIL round %lu: %u primes below 10^6, expected %u\n", r, primes, PRIMES);
			return 1;
		}
		fill(r);
		fast = crc_tabled(0, data, CRC_BYTES);
		slow = crc_bitwise(0, data, CRC_BYTES);
		if (fast != slow) {
			printf("compute: FAIL round %lu: crc32 by table 0x%08x, bit by bit 0x%08x\n", r, fast, slow);
			return 1;
		}
		total = crc_tabled(total, data, CRC_BYTES);
	}
	printf("compute: ok rounds=%lu primes=%u crc=0x%08x\n", rounds, primes, total);
	return 0;
}

int guest_main(void)
{
	uint64_t rounds = cmdline_u64("rounds", DEFAULT_ROUNDS);

	printf("compute: rounds=%lu\n", rounds);
	enter_user(run, &rounds);
}
