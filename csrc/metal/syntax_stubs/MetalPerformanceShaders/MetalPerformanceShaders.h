// Syntax-check stub (see ../README.md): types ATen/mps/MPSStream.h names.
#pragma once
#import <Metal/Metal.h>
@interface MPSCommandBuffer : NSObject <MTLCommandBuffer>
@end
