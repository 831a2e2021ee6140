/* Putting the ABI into the object's BTF, where Python reads it.
 *
 * clang emits BTF only for types reachable from globals, functions and maps. A header
 * that shares a struct or an enum with Python names it here, so the type is in the BTF of
 * every object that includes the header:
 *   ABI_EXPORT(filter_event);        struct filter_event, for ctypes/numpy types
 *   ABI_EXPORT_ENUM(drop_reason);    enum drop_reason, for membrane.abi (make bpf)
 * Numbers Python needs are enumerators, never #defines (a macro leaves no trace in BTF).
 * Values must fit a signed 32-bit int: clang 14 does not record an enum's signedness. */
#ifndef MEMBRANE_ABI_EXPORT_H
#define MEMBRANE_ABI_EXPORT_H

#define ABI_EXPORT(tag) struct tag *__abi_##tag __attribute__((used))
#define ABI_EXPORT_ENUM(tag) enum tag *__abi_enum_##tag __attribute__((used))

#endif
