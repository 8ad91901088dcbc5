// Threads allocate and free (sizes 16 B .. 4 MiB, patterns checked before each free) while the main
// thread calls mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD) with alternating values, as pcbench's
// allocator.tune() did under running threads before c905f9b. A heap corruption shows as a glibc
// abort or a pattern mismatch (exit 3).
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <stdint.h>
#define SLOTS 256
static volatile int stop = 0;
static long long ops[64];
static size_t pick(unsigned *s) {
  unsigned r = rand_r(s) % 100;
  if (r < 70) return 16 + rand_r(s) % 160;        // fastbin sizes
  if (r < 90) return 200 + rand_r(s) % 4000;
  if (r < 98) return 4096 + rand_r(s) % (256 << 10);
  return (128 << 10) + rand_r(s) % (4 << 20);      // around both mmap thresholds
}
static void *work(void *arg) {
  int id = (int)(intptr_t)arg; unsigned s = 1234 + id;
  unsigned char *p[SLOTS] = {0}; size_t n[SLOTS] = {0};
  while (!stop) {
    int k = rand_r(&s) % SLOTS;
    if (p[k]) {
      unsigned char v = (unsigned char)(k ^ id);
      for (size_t i = 0; i < n[k]; i += 61) if (p[k][i] != v) { fprintf(stderr, "pattern mismatch\n"); exit(3); }
      free(p[k]); p[k] = 0;
    } else {
      n[k] = pick(&s); p[k] = malloc(n[k]); memset(p[k], (unsigned char)(k ^ id), n[k]);
    }
    ops[id]++;
  }
  for (int k = 0; k < SLOTS; k++) free(p[k]);
  return 0;
}
int main(int argc, char **argv) {
  int T = atoi(argv[1]); double secs = atof(argv[2]);
  pthread_t th[64];
  for (int i = 0; i < T; i++) pthread_create(&th[i], 0, work, (void *)(intptr_t)i);
  struct timespec t0, t; clock_gettime(CLOCK_MONOTONIC, &t0);
  long calls = 0;
  do {
    int hi = calls & 1;
    mallopt(M_MMAP_THRESHOLD, hi ? (32 << 20) : (128 << 10));
    mallopt(M_TRIM_THRESHOLD, hi ? (256 << 20) : (128 << 10));
    calls += 2;
    clock_gettime(CLOCK_MONOTONIC, &t);
  } while ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 < secs);
  stop = 1;
  long long total = 0;
  for (int i = 0; i < T; i++) { pthread_join(th[i], 0); total += ops[i]; }
  printf("{\"threads\": %d, \"seconds\": %.0f, \"mallopt_calls\": %ld, \"malloc_free_ops\": %lld}\n", T, secs, calls, total);
  return 0;
}
