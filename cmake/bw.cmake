# Build helpers: the one warning list, sanitizers, hardening, and the test helper.

set(BW_WARNINGS -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes
  -Wformat=2 -Wwrite-strings -Wvla -Wno-format-nonliteral)

# _POSIX_C_SOURCE/_DEFAULT_SOURCE: C11 without extensions still needs POSIX.
set(BW_DEFINES _POSIX_C_SOURCE=200809L _DEFAULT_SOURCE)

function(bw_target_setup target)
  target_compile_options(${target} PRIVATE ${BW_WARNINGS})
  target_compile_definitions(${target} PRIVATE ${BW_DEFINES})
  if(BW_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
  if(BW_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=address,undefined
      -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
    target_link_options(${target} PRIVATE -fsanitize=address,undefined)
  elseif(CMAKE_BUILD_TYPE MATCHES "Rel")
    target_compile_options(${target} PRIVATE -fstack-protector-strong
      -D_FORTIFY_SOURCE=2 -fPIE)
    target_link_options(${target} PRIVATE -pie -Wl,-z,relro,-z,now)
  endif()
endfunction()

# bw_add_unit_test(NAME SOURCES...): one cmocka executable per module.
function(bw_add_unit_test name)
  add_executable(${name} ${ARGN})
  bw_target_setup(${name})
  target_link_libraries(${name} PRIVATE bw_common PkgConfig::CMOCKA)
  target_compile_definitions(${name} PRIVATE BW_TEST_NAME="${name}")
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES LABELS unit
    ENVIRONMENT "CMOCKA_MESSAGE_OUTPUT=stdout")
endfunction()

# bw_add_process_test(NAME SOURCE LABEL [BROKER]): a cmocka program that drives real processes
# (qemu-nbd, a broker); BROKER runs it through tests/with-broker, which gives it a private
# broker of its own. Extra environment: set_tests_properties after.
function(bw_add_process_test name source label)
  add_executable(${name} ${source})
  bw_target_setup(${name})
  target_link_libraries(${name} PRIVATE bw_common PkgConfig::CMOCKA)
  target_compile_definitions(${name} PRIVATE BW_TEST_NAME="${name}")
  if("BROKER" IN_LIST ARGN)
    add_test(NAME ${name}
      COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/with-broker $<TARGET_FILE:${name}>)
  else()
    add_test(NAME ${name} COMMAND ${name})
  endif()
  set_tests_properties(${name} PROPERTIES LABELS ${label} TIMEOUT 300
    ENVIRONMENT "CMOCKA_MESSAGE_OUTPUT=stdout")
endfunction()
