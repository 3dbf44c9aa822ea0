#ifndef CZEROMQ_SHIM_H
#define CZEROMQ_SHIM_H
#include <zmq.h>
// mallopt: the wire layer raises glibc's mmap threshold so large message buffers are reused.
#include <malloc.h>
#endif
