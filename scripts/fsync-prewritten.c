/* fdatasync cost: appending (each write extends the file) against overwriting blocks written
 * beforehand (the file's size never changes). One thread, pwrite at increasing offsets, one
 * fdatasync per write. Prints syncs/s, wall and CPU (user+sys) time per sync.
 *
 *   gcc -O2 -o /tmp/fsync-prewritten scripts/fsync-prewritten.c
 *   /tmp/fsync-prewritten FILE PREWRITTEN(0|1) COUNT WRITE_BYTES   # e.g. target/probe 1 3000 1082
 *
 * BENCHMARKS.md ("zeros written ahead") alternates PREWRITTEN 0 and 1, 3 runs each, for
 * 1,082-byte (3,000 syncs) and 35,000-byte (1,000 syncs) writes. The file is removed at the end. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <unistd.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
static double cpu(){struct rusage r;getrusage(RUSAGE_SELF,&r);return r.ru_utime.tv_sec+r.ru_utime.tv_usec/1e6+r.ru_stime.tv_sec+r.ru_stime.tv_usec/1e6;}
int main(int argc,char**argv){
  int pre=atoi(argv[2]); int n=atoi(argv[3]); size_t bs=atoi(argv[4]);
  int fd=open(argv[1],O_RDWR|O_CREAT|O_TRUNC,0644);
  char *buf=malloc(1<<20); memset(buf,0,1<<20);
  if(pre){ for(size_t off=0; off<(size_t)n*bs+ (1<<20); off+= (1<<20)) pwrite(fd,buf,1<<20,off); fsync(fd);}
  memset(buf,'x',bs);
  double t0=now(),c0=cpu();
  for(int i=0;i<n;i++){ pwrite(fd,buf,bs,(off_t)i*bs); fdatasync(fd);}
  double t1=now(),c1=cpu();
  printf("%s pre=%d bs=%zu: %.0f syncs/s, %.1f us/sync wall, %.1f us cpu/sync\n",argv[1],pre,bs,n/(t1-t0),(t1-t0)/n*1e6,(c1-c0)/n*1e6);
  close(fd); unlink(argv[1]); return 0;}
